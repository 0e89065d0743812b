"""Sparse volumetric attention: Triton kernel and the CPU visited-blocks path vs the float64 SDPA
reference, empty rows, the dispatcher, and the ONNX formulation through torch.onnx.export + onnxruntime.

Without CUDA the kernel runs in Triton's interpreter (tests/kernels/conftest.py), so sizes are tiny.
Tolerances: ||out - ref|| / ||ref|| <= 1e-4 for fp32, <= 1e-2 for fp16/bf16; NaN never passes.
"""

from __future__ import annotations

import pytest
import torch
from edgevlm.kernels import attention, attention_blocks, attention_onnx, attention_reference, volumetric_attention
from edgevlm.kernels.mask3d import SparseSpec

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))



def _inputs(b, h, n, hd, dtype, device):
    return [torch.randn(b, h, n, hd, device=device).to(dtype) for _ in range(3)]


# grid, n_global, radius, block, head_dim, foreground probability (None: no foreground rule)
SHAPES = [
    ((3, 4, 5), 1, 1, 16, 32, None),  # N = 61: ragged last block
    ((2, 5, 7), 0, 0, 32, 16, 0.3),  # block 32 > BLOCK_N in the interpreter: sub-tile loop
    ((4, 4, 4), 2, 1, 16, 64, 0.5),  # N = 66, globals + foreground
    ((2, 4, 4), 0, 1, 16, 128, None),  # N = 32: even, unmasked path
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("grid", "n_global", "radius", "block", "hd", "p_fg"), SHAPES)
def test_kernel_matches_reference(grid, n_global, radius, block, hd, p_fg, dtype, triton_device, seed):
    device = triton_device
    from edgevlm.kernels.sparse3d import sparse3d_attention_triton

    b, h = 2, 2
    d, hh, w = grid
    fg = None if p_fg is None else (torch.rand(b, d * hh * w, device=device) < p_fg)
    spec = SparseSpec(grid, n_global, radius, block, fg)
    q, k, v = _inputs(b, h, spec.n_tokens, hd, dtype, device)
    kv_num, kv_idx = spec.indices(device)
    out = torch.full_like(q, float("nan"))  # poisoned: an unwritten element fails
    sparse3d_attention_triton(q, k, v, kv_num.to(device), kv_idx.to(device), block, out=out)
    ref = attention_reference(q.double(), k.double(), v.double(), spec)
    assert not torch.isnan(out).any(), f"unwritten or NaN outputs (seed={seed})"
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"rel err {err:.2e} > {TOL[dtype]:.0e} ({dtype}, seed={seed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_rows_are_zero(dtype, triton_device, seed):
    device = triton_device
    from edgevlm.kernels.sparse3d import sparse3d_attention_triton

    grid, block = (3, 4, 4), 16  # 48 tokens, 3 blocks
    b, h, hd = 2, 2, 32
    fg = torch.zeros(b, 48, dtype=torch.bool, device=device)
    fg[1, 20] = True  # batch 1: only block 1 is foreground; batch 0: nothing at all
    spec = SparseSpec(grid, 0, 0, block, fg)  # radius 0: blocks 0 and 2 of batch 1 see nothing either
    q, k, v = _inputs(b, h, spec.n_tokens, hd, dtype, device)
    kv_num, kv_idx = spec.indices(device)
    assert int(kv_num[0].sum()) == 0 and kv_num[1].tolist() == [0, 1, 0]
    out = torch.full_like(q, float("nan"))
    sparse3d_attention_triton(q, k, v, kv_num, kv_idx, block, out=out)
    ref = attention_reference(q.double(), k.double(), v.double(), spec)
    assert bool((out[0] == 0).all()), "a row with no allowed key must be exactly zero"
    assert bool((out[1, :, :16] == 0).all()) and bool((out[1, :, 32:] == 0).all())
    assert bool((ref[0] == 0).all()) and not torch.isnan(ref).any(), "the reference must zero empty rows too"
    assert rel_err(out, ref) <= TOL[dtype], f"seed={seed}"


def test_mask_broadcast_over_batch_and_strided_inputs(triton_device, seed):
    """One mask (no foreground) for a batch of 3; q/k/v as non-contiguous views of a (B, N, 3, H, D) tensor."""
    device = triton_device
    from edgevlm.kernels.sparse3d import sparse3d_attention_triton

    spec = SparseSpec((2, 3, 5), 1, 1, 16)
    b, h, hd = 3, 2, 16
    qkv = torch.randn(b, spec.n_tokens, 3, h, hd, device=device, dtype=torch.float16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D), strided
    kv_num, kv_idx = spec.indices(device)
    assert kv_num.shape[0] == 1
    out = torch.full_like(q, float("nan"))
    sparse3d_attention_triton(q, k, v, kv_num, kv_idx, spec.block, out=out)
    ref = attention_reference(q.double(), k.double(), v.double(), spec)
    assert rel_err(out, ref) <= 1e-2, f"seed={seed}"


@pytest.mark.parametrize(("grid", "n_global", "radius", "block", "hd", "p_fg"),
                         [*SHAPES, ((4, 6, 8), 1, 1, 16, 32, 0.6), ((5, 4, 8), 3, 2, 32, 16, 0.4)])
def test_blocks_path_matches_reference(grid, n_global, radius, block, hd, p_fg, seed):
    """The CPU path gathers key spans (several per query block at radius 1 on these grids, a ragged last
    block, per-row foregrounds) and batches runs of query blocks with equal key sets."""
    b, h = 3, 2
    d, hh, w = grid
    fg = None if p_fg is None else (torch.rand(b, d * hh * w) < p_fg)
    spec = SparseSpec(grid, n_global, radius, block, fg)
    q, k, v = _inputs(b, h, spec.n_tokens, hd, torch.float64, "cpu")
    ref = attention_reference(q, k, v, spec)
    out = attention_blocks(q, k, v, spec)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) <= 1e-12, f"seed={seed}"
    out32 = attention_blocks(q.float(), k.float(), v.float(), spec)
    assert rel_err(out32, ref) <= 1e-5, f"seed={seed}"


def test_blocks_path_zeroes_empty_rows_and_is_what_auto_runs_on_cpu(monkeypatch, seed):
    import edgevlm.kernels.sparse3d as sparse3d

    fg = torch.zeros(2, 48, dtype=torch.bool)
    fg[1, 20] = True  # batch 0: nothing visible; batch 1: only block 1, seen by block 1 alone (radius 0)
    spec = SparseSpec((3, 4, 4), 0, 0, 16, fg)
    q, k, v = _inputs(2, 2, spec.n_tokens, 32, torch.float32, "cpu")
    calls = []
    monkeypatch.setattr(sparse3d, "attention_blocks", lambda *a, **kw: calls.append(1) or attention_blocks(*a, **kw))
    with torch.no_grad():
        out = attention(q, k, v, spec)
    assert calls, "auto on the CPU without gradients must take the visited-blocks path"
    assert bool((out[0] == 0).all()) and bool((out[1, :, :16] == 0).all()) and bool((out[1, :, 32:] == 0).all())
    assert rel_err(out, attention_reference(q.double(), k.double(), v.double(), spec)) <= 1e-5, f"seed={seed}"


def test_dispatcher_and_hook_on_cpu(seed):
    spec = SparseSpec((2, 3, 4), 1, 1, 16, torch.rand(2, 24) < 0.5)
    q, k, v = _inputs(2, 2, spec.n_tokens, 16, torch.float32, "cpu")
    ref = attention_reference(q.double(), k.double(), v.double(), spec)
    for backend in ("auto", "torch", "onnx", "blocks"):
        out = attention(q, k, v, spec, backend=backend)
        assert rel_err(out, ref) <= 1e-5, f"{backend} (seed={seed})"
    out = volumetric_attention(q, k, v, (2, 3, 4), 1, 1, 16, spec.foreground)
    assert rel_err(out, ref) <= 1e-5
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, spec, backend="cuda")


def test_huge_radius_equals_dense_attention(seed):
    q, k, v = _inputs(2, 3, 1 + 3 * 4 * 5, 32, torch.float64, "cpu")
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for backend in ("torch", "onnx", "blocks"):
        spec = SparseSpec((3, 4, 5), 1, 10**3, 16)
        assert rel_err(attention(q, k, v, spec, backend=backend), dense) <= 1e-12, f"{backend} (seed={seed})"


def test_reference_zeroes_empty_rows_without_nan_and_trains():
    fg = torch.zeros(2, 16, dtype=torch.bool)
    fg[1, :4] = True  # batch 0: every row empty; batch 1: block 0 foreground
    spec = SparseSpec((2, 2, 4), 0, 0, 4, fg)
    for fn in (attention_reference, attention_onnx):
        q = torch.randn(2, 2, 16, 16, dtype=torch.float64, requires_grad=True)
        out = fn(q, q, q, spec)
        assert bool((out[0] == 0).all()) and bool((out[1, :, 4:] == 0).all()), fn.__name__
        out.square().sum().backward()  # the gradient through empty rows must be finite, not NaN
        assert torch.isfinite(q.grad).all() and bool(q.grad[1, :, :4].abs().sum() > 0), fn.__name__
    # auto: gradients needed -> the differentiable reference path, on any device
    q = torch.randn(2, 2, 16, 16, requires_grad=True)
    attention(q, q, q, spec).sum().backward()
    assert torch.isfinite(q.grad).all()


def test_onnx_export_matches_reference(tmp_path, seed):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from edgevlm.kernels import foreground_from_volume

    grid, patch = (2, 3, 4), (2, 2, 2)

    class Tiny(torch.nn.Module):
        # The encoder's use: foreground computed in the graph from the volume, mask from mask3d.
        def forward(self, q, k, v, vol):
            fg = foreground_from_volume(vol, patch, 0.5, 0.2)
            return volumetric_attention(q, k, v, grid, 1, 1, 16, fg)

    b, h, hd = 2, 2, 16
    n = 1 + 24
    q, k, v = _inputs(b, h, n, hd, torch.float32, "cpu")
    vol = torch.rand(b, 1, 4, 6, 8)
    vol[1] *= 0.3  # batch 1 is all "air": only the global block stays
    path = tmp_path / "sparse3d.onnx"
    torch.onnx.export(Tiny().eval(), (q, k, v, vol), str(path), input_names=["q", "k", "v", "vol"], dynamo=True)

    import onnx

    graph = onnx.load(str(path)).graph
    # Standard ops only: the default ONNX domain, no contrib/custom ops, no local functions.
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")})
    assert not foreign, f"non-standard ops in the export: {foreign}"
    assert {"MatMul", "Softmax", "Where"} <= {n.op_type for n in graph.node}

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "vol": vol.numpy()}
    got = torch.from_numpy(sess.run(None, feed)[0])
    spec = SparseSpec(grid, 1, 1, 16, foreground_from_volume(vol, patch, 0.5, 0.2))
    ref = attention_reference(q.double(), k.double(), v.double(), spec)
    assert rel_err(got, ref) <= 1e-5, f"seed={seed}"
    assert not bool(spec.foreground[1].any()), "test setup: batch 1 should have no foreground"
