"""Fused 3D patch embedding: Triton kernel vs the float64 unfused reference, and the layout facts
it rests on (patch vector order, Conv3d equivalence).

Without CUDA the kernel runs in Triton's interpreter (tests/kernels/conftest.py), so sizes are tiny.
Tolerances: ||out - ref|| / ||ref|| <= 1e-4 for fp32 weights/output, <= 1e-2 for fp16/bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from edgevlm.kernels import IntensityWindow, conv_weight_to_linear, patch_embed
from edgevlm.kernels.patch_embed import normalize_intensity, patch_embed_reference, patch_embed_unfused

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}



def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _volume(b, c, dhw, dtype, device):
    if dtype == torch.int16:  # CT in HU, including values outside the window on both sides
        return torch.randint(-1024, 2000, (b, c, *dhw), dtype=torch.int16, device=device)
    return (torch.randn(b, c, *dhw, device=device) * 2).to(dtype)


# patch, grid, channels, dim, window. K = pd*ph*pw*C: 24 and 18 are not multiples of BLOCK_K=16,
# dims 40 and 24 not of BLOCK_N=32, token counts 30 and 12 not of BLOCK_M=16.
SHAPES = [
    ((2, 3, 4), (2, 3, 5), 1, 40, IntensityWindow(-1000, 1000, -1.0, 1.0)),
    ((1, 3, 3), (3, 2, 2), 2, 24, IntensityWindow(-160, 240)),
    ((4, 4, 4), (1, 2, 2), 1, 64, IntensityWindow(-1.5, 2.0)),
]


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("v_dtype", [torch.int16, torch.float32, torch.float16])
@pytest.mark.parametrize(("patch", "grid", "c", "dim", "window"), SHAPES)
def test_kernel_matches_reference(patch, grid, c, dim, window, v_dtype, w_dtype, triton_device, seed):
    device = triton_device
    from edgevlm.kernels.patch_embed import patch_embed_triton

    b = 2
    dhw = tuple(g * p for g, p in zip(grid, patch, strict=True))
    n_tok, k_len = grid[0] * grid[1] * grid[2], patch[0] * patch[1] * patch[2] * c
    vol = _volume(b, c, dhw, v_dtype, device)
    weight = (torch.randn(dim, k_len, device=device) / k_len**0.5).to(w_dtype)
    bias = torch.randn(dim, device=device).to(w_dtype)
    pos = torch.randn(1, n_tok, dim, device=device)  # fp32 position table, as checkpoints store it
    out = torch.full((b, n_tok, dim), float("nan"), dtype=w_dtype, device=device)  # poisoned
    patch_embed_triton(vol, weight, bias, pos, patch, window, out=out)
    ref = patch_embed_reference(vol, weight, bias, pos, patch, window)
    assert not torch.isnan(out).any(), f"unwritten outputs (seed={seed})"
    err = rel_err(out, ref)
    assert err <= TOL[w_dtype], f"rel err {err:.2e} ({v_dtype} -> {w_dtype}, seed={seed})"


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_kernel_without_bias_pos_and_other_out_dtype(out_dtype, triton_device, seed):
    device = triton_device
    from edgevlm.kernels.patch_embed import patch_embed_triton

    patch = (2, 2, 2)  # grid (3, 3, 3)
    vol = _volume(3, 1, (6, 6, 6), torch.int16, device)
    weight = torch.randn(48, 8, device=device, dtype=torch.float16)
    ref = patch_embed_reference(vol, weight, None, None, patch, (-500, 500))
    out = patch_embed_triton(vol, weight, None, None, patch, (-500, 500), out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (3, 27, 48)
    assert rel_err(out, ref) <= 1e-2, f"seed={seed}"


def test_kernel_strided_volume(triton_device, seed):
    """A non-contiguous volume (a crop of a larger one) is read through its strides."""
    device = triton_device
    from edgevlm.kernels.patch_embed import patch_embed_triton

    big = _volume(2, 1, (6, 10, 12), torch.float32, device)
    vol = big[:, :, 1:5, 2:8, 3:11]  # (2, 1, 4, 6, 8), strided
    weight = torch.randn(32, 16, device=device)
    out = patch_embed_triton(vol, weight, None, None, (2, 2, 4), (-1.0, 1.0))
    ref = patch_embed_reference(vol.contiguous(), weight, None, None, (2, 2, 4), (-1.0, 1.0))
    assert rel_err(out, ref) <= 1e-4, f"seed={seed}"


def test_patch_order_and_conv3d_equivalence(seed):
    """Our (pd, ph, pw, C) vector order with conv_weight_to_linear equals a stride=kernel Conv3d."""
    patch, c, dim = (2, 3, 2), 2, 12
    vol = torch.randn(2, c, 4, 6, 8, dtype=torch.float64)
    conv_w = torch.randn(dim, c, *patch, dtype=torch.float64)
    conv_b = torch.randn(dim, dtype=torch.float64)
    conv = F.conv3d(normalize_intensity(vol, (-1.0, 1.0)), conv_w, conv_b, stride=patch)  # (B, dim, gd, gh, gw)
    want = conv.flatten(2).transpose(1, 2)  # (B, N, dim), raster order
    got = patch_embed_unfused(vol, conv_weight_to_linear(conv_w), conv_b, None, patch, (-1.0, 1.0))
    assert rel_err(got, want) <= 1e-12, f"seed={seed}"


def test_window_clips_and_rescales():
    x = torch.tensor([-2000.0, -1000.0, 0.0, 1000.0, 3000.0], dtype=torch.float64)
    y = normalize_intensity(x, IntensityWindow(-1000, 1000, -1.0, 1.0))
    assert y.tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]


def test_dispatcher_on_cpu_and_preconditions(seed):
    vol = _volume(1, 1, (4, 4, 4), torch.int16, "cpu")
    weight = torch.randn(16, 8)
    got = patch_embed(vol, weight, torch.randn(16), torch.randn(8, 16), (2, 2, 2), (-1000, 1000))
    assert got.shape == (1, 8, 16) and got.dtype == torch.float32
    with pytest.raises(AssertionError, match="not divisible by patch"):
        patch_embed(vol, weight, None, None, (3, 2, 2), (-1000, 1000))
    with pytest.raises(AssertionError, match="weight must be"):
        patch_embed(vol, torch.randn(16, 9), None, None, (2, 2, 2), (-1000, 1000))
    with pytest.raises(AssertionError, match="hi > lo"):
        patch_embed(vol, weight, None, None, (2, 2, 2), (1000, -1000))
