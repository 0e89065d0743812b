"""Fused 3D patch embedding (DESIGN.md decisions 2 and 7): Triton kernel, wrapper, reference.

One pass from the raw volume to tokens:
    y      = clip((x - lo) / (hi - lo), 0, 1) * (out_hi - out_lo) + out_lo      (intensity window)
    patch  = y.view(B, C, gd, pd, gh, ph, gw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
              .reshape(B, N, pd*ph*pw*C)                                         (patch vector order: pd, ph, pw, C)
    tokens = patch @ W.T + bias + pos                                            (W: (dim, pd*ph*pw*C))
Tokens are in raster order over the grid (gd, gh, gw) = (D/pd, H/ph, W/pw).

The unfused path reads and writes the volume three or four times (cast/normalize, permute copy, GEMM
input, + pos); the kernel reads each voxel once (per N-tile, through L2) and writes each token once.
A Conv3d patchify checkpoint loads by `conv_weight_to_linear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sparse3d import HAS_TRITON, triton_interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

Patch = tuple[int, int, int]
SUPPORTED_VOLUME_DTYPES = (torch.int16, torch.uint8, torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class IntensityWindow:
    """Maps [lo, hi] (e.g. HU) to [out_lo, out_hi], clipping outside. E.g. CT soft tissue
    IntensityWindow(-160, 240) -> [0, 1]; M3D-style min-max is lo=min, hi=max."""

    lo: float
    hi: float
    out_lo: float = 0.0
    out_hi: float = 1.0

    def __post_init__(self) -> None:
        assert self.hi > self.lo, f"intensity window needs hi > lo, got lo={self.lo}, hi={self.hi}"


def _as_window(window: IntensityWindow | tuple[float, ...]) -> IntensityWindow:
    return window if isinstance(window, IntensityWindow) else IntensityWindow(*window)


def conv_weight_to_linear(conv_weight: torch.Tensor) -> torch.Tensor:
    """Conv3d patchify weight (dim, C, pd, ph, pw) -> Linear weight (dim, pd*ph*pw*C) in our vector order."""
    assert conv_weight.dim() == 5, f"expected a Conv3d weight (dim, C, pd, ph, pw), got {tuple(conv_weight.shape)}"
    return conv_weight.permute(0, 2, 3, 4, 1).reshape(conv_weight.shape[0], -1)


# ----------------------------------------------------------------------------------------------------
# Reference / unfused path
# ----------------------------------------------------------------------------------------------------
def normalize_intensity(x: torch.Tensor, window: IntensityWindow | tuple[float, ...]) -> torch.Tensor:
    """Window + clip + rescale, in x's (floating) dtype."""
    win = _as_window(window)
    y = ((x - win.lo) / (win.hi - win.lo)).clamp(0.0, 1.0)
    return y * (win.out_hi - win.out_lo) + win.out_lo


def patchify(x: torch.Tensor, patch: Patch) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, N, pd*ph*pw*C), tokens in raster order (gd, gh, gw)."""
    b, c, d, h, w = x.shape
    pd, ph, pw = patch
    gd, gh, gw = d // pd, h // ph, w // pw
    x = x.view(b, c, gd, pd, gh, ph, gw, pw)  # (B, C, gd, pd, gh, ph, gw, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, gd, gh, gw, pd, ph, pw, C)
    return x.reshape(b, gd * gh * gw, pd * ph * pw * c)  # (B, N, pd*ph*pw*C)


def patch_embed_unfused(
    volume: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos: torch.Tensor | None,
    patch: Patch,
    window: IntensityWindow | tuple[float, ...],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The unfused PyTorch path: normalize -> reshape -> Linear -> + pos, computed in `dtype`
    (default: weight.dtype; pass torch.float64 for the test reference). Returns (B, N, dim)."""
    dtype = dtype or weight.dtype
    # Normalize in at least fp32: an int16 HU value is not exact in fp16/bf16.
    norm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    y = normalize_intensity(volume.to(norm_dtype), window).to(dtype)  # (B, C, D, H, W)
    tokens = F.linear(patchify(y, patch), weight.to(dtype), None if bias is None else bias.to(dtype))
    if pos is not None:
        tokens = tokens + pos.to(dtype).reshape(1, tokens.shape[1], tokens.shape[2])
    return tokens


def patch_embed_reference(
    volume: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos: torch.Tensor | None,
    patch: Patch,
    window: IntensityWindow | tuple[float, ...],
) -> torch.Tensor:
    """float64 reference of the fused kernel (on the CPU), (B, N, dim) float64."""
    cpu = torch.device("cpu")
    return patch_embed_unfused(
        volume.to(cpu),
        weight.to(cpu),
        None if bias is None else bias.to(cpu),
        None if pos is None else pos.to(cpu),
        patch,
        window,
        dtype=torch.float64,
    )


# ----------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------
if HAS_TRITON:

    def _patch_embed_configs() -> list:
        if triton_interpreting():
            # One small config: no autotuning under the interpreter; BLOCK_K=16 makes K ragged for
            # odd patches, so the K masking is exercised.
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for (bm, bn, bk, w, s) in (
                (128, 128, 64, 8, 3),
                (128, 256, 64, 8, 3),
                (64, 256, 64, 8, 3),
                (128, 128, 64, 4, 4),
                (64, 128, 64, 4, 4),
                (128, 64, 64, 4, 4),
                (128, 128, 32, 4, 4),
                (256, 128, 64, 8, 3),
            )
        ]

    @triton.autotune(configs=_patch_embed_configs(), key=["M", "K", "DIM"])
    @triton.jit
    def _patch_embed_kernel(
        X_ptr, W_ptr, Bias_ptr, Pos_ptr, Out_ptr,
        M, N_TOK, DIM, K,
        GH, GW,
        stride_xb, stride_xc, stride_xd, stride_xh, stride_xw,
        stride_wn, stride_wk,
        stride_pn, stride_pd,
        stride_ob, stride_on, stride_od,
        lo, inv_range, out_lo, out_scale,
        PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, C: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_POS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOT_UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # GEMM (M tokens) x (K = pd*ph*pw*C) x (DIM). N-tiles of one M-tile are adjacent program ids, so
        # they run together and the volume tile is read from DRAM about once, then from L2.
        pid = tl.program_id(0)
        num_pid_n = (DIM + BLOCK_N - 1) // BLOCK_N  # not tl.cdiv: see tests/kernels/conftest.py
        pid_m = pid // num_pid_n
        pid_n = pid % num_pid_n

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # global token index b*N_TOK + t
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # embedding channel
        mask_m = offs_m < M
        mask_n = offs_n < DIM

        # Token -> (b, gz, gy, gx) -> offset of the patch's first voxel. int64: a batch of volumes
        # can hold more than 2**31 voxels.
        b = offs_m // N_TOK
        t = offs_m % N_TOK
        gz = t // (GH * GW)
        gy = (t // GW) % GH
        gx = t % GW
        row_off = (
            b.to(tl.int64) * stride_xb
            + (gz * PD).to(tl.int64) * stride_xd
            + (gy * PH).to(tl.int64) * stride_xh
            + (gx * PW).to(tl.int64) * stride_xw
        )

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            # Patch-vector index k -> (kz, ky, kx, c), order (pd, ph, pw, C): consecutive k walk x in
            # memory, so each token's row segment is PW contiguous voxels. PD/PH/PW/C are constexpr,
            # so these divisions are shifts/multiplies.
            c = offs_k % C
            kx = (offs_k // C) % PW
            ky = (offs_k // (C * PW)) % PH
            kz = offs_k // (C * PW * PH)
            col_off = c * stride_xc + kz * stride_xd + ky * stride_xh + kx * stride_xw
            x_ptrs = X_ptr + row_off[:, None] + col_off[None, :]
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0).to(tl.float32)
            # Intensity window in fp32, then zero the K padding (the window maps 0 to a non-zero value).
            y = tl.minimum(tl.maximum((x - lo) * inv_range, 0.0), 1.0) * out_scale + out_lo
            y = tl.where(mask_k[None, :], y, 0.0)

            w_ptrs = W_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BLOCK_K, BLOCK_N)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if DOT_UPCAST:
                # Interpreter only: it multiplies bf16 bit patterns in tl.dot (triton#11584). Round y to
                # bf16 first, as the GPU path does, then compute exactly in fp32.
                acc += tl.dot(y.to(w.dtype).to(tl.float32), w.to(tl.float32))
            else:
                acc += tl.dot(y.to(w.dtype), w, input_precision=DOT_PRECISION)

        if HAS_BIAS:
            bias = tl.load(Bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += bias[None, :]
        if HAS_POS:
            # Position embedding (N_TOK, DIM), shared by the batch: indexed by the token within its volume.
            p_ptrs = Pos_ptr + t[:, None] * stride_pn + offs_n[None, :] * stride_pd
            acc += tl.load(p_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)

        o_ptrs = Out_ptr + b.to(tl.int64)[:, None] * stride_ob + t[:, None] * stride_on + offs_n[None, :] * stride_od
        tl.store(o_ptrs, acc.to(Out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def patch_embed_triton(
    volume: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos: torch.Tensor | None,
    patch: Patch,
    window: IntensityWindow | tuple[float, ...],
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused patch embedding with the Triton kernel. Shapes as in `patch_embed`."""
    assert HAS_TRITON, "triton is not installed: use patch_embed_unfused"
    assert volume.is_cuda or triton_interpreting(), "the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)"
    b, c, n_tok, dim, k_len, (_, gh, gw) = _check_inputs(volume, weight, bias, pos, patch)
    win = _as_window(window)
    out_dtype = out_dtype or weight.dtype
    assert out_dtype in SUPPORTED_WEIGHT_DTYPES, f"out_dtype must be one of {SUPPORTED_WEIGHT_DTYPES}"
    if out is None:
        out = torch.empty(b, n_tok, dim, dtype=out_dtype, device=volume.device)
    assert out.shape == (b, n_tok, dim) and out.dtype == out_dtype and out.device == volume.device, (
        f"out must be ({b}, {n_tok}, {dim}) {out_dtype} on {volume.device}"
    )
    pos2 = None if pos is None else pos.reshape(n_tok, dim)
    m = b * n_tok

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(dim, meta["BLOCK_N"]),)

    dummy = weight  # never read when HAS_BIAS / HAS_POS is False
    _patch_embed_kernel[grid](
        volume, weight, dummy if bias is None else bias, dummy if pos2 is None else pos2, out,
        m, n_tok, dim, k_len,
        gh, gw,
        *volume.stride(),
        *weight.stride(),
        *((0, 0) if pos2 is None else pos2.stride()),
        *out.stride(),
        float(win.lo), 1.0 / (float(win.hi) - float(win.lo)), float(win.out_lo), float(win.out_hi - win.out_lo),
        PD=patch[0], PH=patch[1], PW=patch[2], C=c,
        HAS_BIAS=bias is not None,
        HAS_POS=pos2 is not None,
        # fp32 weights: exact fp32 dot (tf32 would miss the 1e-4 budget).
        DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        DOT_UPCAST=(weight.dtype == torch.bfloat16 and triton_interpreting()),
    )  # fmt: skip
    return out


def _check_inputs(
    volume: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos: torch.Tensor | None,
    patch: Patch,
) -> tuple[int, int, int, int, int, tuple[int, int, int]]:
    assert volume.dim() == 5, f"volume must be (B, C, D, H, W), got shape {tuple(volume.shape)}"
    assert volume.dtype in SUPPORTED_VOLUME_DTYPES, (
        f"volume dtype {volume.dtype} not supported; use one of {SUPPORTED_VOLUME_DTYPES}"
    )
    assert len(patch) == 3 and all(int(p) >= 1 for p in patch), f"patch must be 3 positive ints, got {patch}"
    b, c, d, h, w = volume.shape
    pd, ph, pw = patch
    assert d % pd == 0 and h % ph == 0 and w % pw == 0, (
        f"volume (D, H, W) = {(d, h, w)} is not divisible by patch {tuple(patch)}; crop or pad in preprocessing"
    )
    gd, gh, gw = d // pd, h // ph, w // pw
    n_tok, k_len = gd * gh * gw, pd * ph * pw * c
    assert weight.dim() == 2 and weight.shape[1] == k_len, (
        f"weight must be (dim, pd*ph*pw*C) = (dim, {k_len}), got {tuple(weight.shape)}; "
        "a Conv3d weight loads through conv_weight_to_linear"
    )
    assert weight.dtype in SUPPORTED_WEIGHT_DTYPES, f"weight dtype must be one of {SUPPORTED_WEIGHT_DTYPES}"
    dim = weight.shape[0]
    assert bias is None or bias.shape == (dim,), f"bias must be ({dim},), got {tuple(bias.shape)}"
    assert pos is None or pos.numel() == n_tok * dim, (
        f"pos must hold (N, dim) = ({n_tok}, {dim}) values (grid {(gd, gh, gw)}), got {tuple(pos.shape)}"
    )
    for name, t in (("weight", weight), ("bias", bias), ("pos", pos)):
        assert t is None or t.device == volume.device, f"{name} is on {t.device}, volume on {volume.device}"
    return b, c, n_tok, dim, k_len, (gd, gh, gw)


def patch_embed(
    volume: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos: torch.Tensor | None,
    patch: Patch,
    window: IntensityWindow | tuple[float, ...],
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Volume (B, C, D, H, W) int16/uint8/fp16/bf16/fp32 -> tokens (B, N, dim) in out_dtype
    (default weight.dtype). weight (dim, pd*ph*pw*C); bias (dim,) or None; pos (N, dim) / (1, N, dim) or None;
    window: IntensityWindow or (lo, hi[, out_lo, out_hi]).

    Triton kernel on CUDA; the unfused PyTorch path on CPU (tests call patch_embed_triton directly under
    TRITON_INTERPRET=1), in the
    weight's dtype, since Triton runs only on the GPU.
    """
    _check_inputs(volume, weight, bias, pos, patch)
    if HAS_TRITON and volume.is_cuda and not _exporting():
        return patch_embed_triton(volume, weight, bias, pos, patch, window, out_dtype)
    out = patch_embed_unfused(volume, weight, bias, pos, patch, window)
    return out if out_dtype is None else out.to(out_dtype)


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
