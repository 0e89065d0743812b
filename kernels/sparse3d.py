"""Block-sparse volumetric attention (DESIGN.md decision 6): Triton forward kernel, its wrapper,
its float64-capable reference, the ONNX-exportable formulation, and the dispatcher.

The mask is defined once, in `mask3d.py`; every path here derives from it:
- Triton kernel: FlashAttention-style forward (online softmax, no N x N matrix) that visits only the
  key blocks listed by `mask3d.block_indices` (kv_num_blocks / kv_indices, FlexAttention's layout).
- Reference: `scaled_dot_product_attention` with `mask3d.token_mask` (boolean, True = attend).
- ONNX formulation: matmul + `torch.where(mask, scores, -inf)` + softmax + matmul, standard ops only.
- Blocks (CPU inference): per run of query blocks with the same key blocks, one SDPA on those keys only,
  read from the same index form as the kernel; no N x N mask, no scores for skipped blocks.
Rows with no allowed key output zeros on every path (SDPA alone would give NaN or backend-dependent
values there, so the reference and the ONNX formulation zero those rows explicitly).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

from .mask3d import SparseSpec

try:  # Triton is optional: without it edgevlm.kernels still imports and runs the reference paths.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


def triton_interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1, read when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------
if HAS_TRITON:

    def _fwd_configs() -> list:
        if triton_interpreting():
            # One config: the interpreter runs every program in numpy, autotuning would only cost time.
            # 16x16 tiles also exercise the sub-tile loop when the mask block is 32.
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
        # Hopper/Ampere: tutorial-06 sized tiles, kept few (each is a compile); BLOCK_M/BLOCK_N must
        # divide the mask block (pruned below).
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for (bm, bn, w, s) in (
                (64, 32, 4, 3),
                (64, 64, 4, 2),
                (64, 64, 4, 3),
                (64, 128, 4, 3),
                (128, 32, 8, 3),
                (128, 64, 4, 3),
                (128, 64, 8, 3),
                (128, 128, 8, 3),
            )
        ]

    def _prune_fwd_configs(configs: list, named_args: dict, **kwargs) -> list:
        mask_block = kwargs["MASK_BLOCK"]
        head_dim = kwargs["HEAD_DIM"]
        kept = [
            c
            for c in configs
            if c.kwargs["BLOCK_M"] <= mask_block
            and c.kwargs["BLOCK_N"] <= mask_block
            # 128x128 tiles at head_dim 128 spill registers; keep them for smaller heads only.
            and not (head_dim >= 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 64)
        ]
        if not kept:  # tiny mask blocks (tests): fall back to the smallest legal tile
            kept = [triton.Config({"BLOCK_M": mask_block, "BLOCK_N": mask_block}, num_warps=4, num_stages=2)]
        return kept

    @triton.autotune(
        configs=_fwd_configs(),
        key=["HEAD_DIM", "MASK_BLOCK", "EVEN_N"],
        prune_configs_by={"early_config_prune": _prune_fwd_configs},
    )
    @triton.jit
    def _sparse3d_fwd_kernel(
        Q_ptr, K_ptr, V_ptr, Out_ptr,
        KvNum_ptr, KvIdx_ptr,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_cb, stride_cq,
        stride_ib, stride_iq, stride_ik,
        H, N, qk_scale,
        HEAD_DIM: tl.constexpr,
        MASK_BLOCK: tl.constexpr,
        EVEN_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOT_UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # One program = BLOCK_M queries of one (batch, head). BLOCK_M divides MASK_BLOCK, so all its
        # queries share one query block and thus one list of key blocks.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        off_b = (pid_bh // H).to(tl.int64)  # int64: batch/head offsets can pass 2**31 elements
        off_h = (pid_bh % H).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n0 = tl.arange(0, BLOCK_N)

        q_base = Q_ptr + off_b * stride_qb + off_h * stride_qh
        k_base = K_ptr + off_b * stride_kb + off_h * stride_kh
        v_base = V_ptr + off_b * stride_vb + off_h * stride_vh
        o_base = Out_ptr + off_b * stride_ob + off_h * stride_oh

        q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs) if EVEN_N else tl.load(q_ptrs, mask=offs_m[:, None] < N, other=0.0)

        # Sparse index form: kv_num_blocks[b, qb] and kv_indices[b, qb, :]. The batch stride is 0 when
        # the mask has no foreground rule (one mask for the whole batch).
        qb = (pid_m * BLOCK_M) // MASK_BLOCK
        n_kv = tl.load(KvNum_ptr + off_b * stride_cb + qb * stride_cq)
        idx_base = KvIdx_ptr + off_b * stride_ib + qb * stride_iq

        # Online softmax state in fp32; exp2 with log2(e) folded into qk_scale (tutorial 06).
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        # One flat loop over (listed key block, BLOCK_N sub-tile) keeps a single pipelineable loop.
        SUB_N: tl.constexpr = MASK_BLOCK // BLOCK_N
        for it in range(0, n_kv * SUB_N):
            kb = tl.load(idx_base + (it // SUB_N) * stride_ik)
            offs_n = kb * MASK_BLOCK + (it % SUB_N) * BLOCK_N + offs_n0
            # K loaded transposed, (HEAD_DIM, BLOCK_N), so the score tile is a plain dot.
            kt_ptrs = k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
            v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
            if EVEN_N:
                kt = tl.load(kt_ptrs)
                v = tl.load(v_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=offs_n[None, :] < N, other=0.0)
                v = tl.load(v_ptrs, mask=offs_n[:, None] < N, other=0.0)

            if DOT_UPCAST:
                # Interpreter only: it multiplies bf16 bit patterns in tl.dot (triton#11584); bf16 -> fp32
                # is exact and the GPU accumulates in fp32 too, so this matches the hardware result.
                qk = tl.dot(q.to(tl.float32), kt.to(tl.float32)) * qk_scale
            else:
                qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            if not EVEN_N:
                # Key positions past N (ragged last block) never count.
                qk = tl.where(offs_n[None, :] < N, qk, float("-inf"))
            # Every listed block holds at least one real key, so m_new is finite on the first visit
            # and alpha = exp2(-inf) = 0 cleanly wipes the initial state.
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if DOT_UPCAST:
                pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
            else:
                pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        # Rows that visited no key block (foreground rule) have l_i == 0 and acc == 0: output zeros.
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_ptrs = o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
        if EVEN_N:
            tl.store(o_ptrs, out.to(Out_ptr.dtype.element_ty))
        else:
            tl.store(o_ptrs, out.to(Out_ptr.dtype.element_ty), mask=offs_m[:, None] < N)


def sparse3d_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block: int,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention forward with the Triton kernel.

    q, k, v: (B, heads, N, head_dim), same shape/dtype/device; CUDA (or CPU under TRITON_INTERPRET=1).
    kv_num_blocks: (B or 1, nQB) int32; kv_indices: (B or 1, nQB, nKB) int32 (see mask3d.block_indices).
    block: the mask block size in tokens (power of two >= 16). out: optional preallocated output.
    """
    assert HAS_TRITON, "triton is not installed: use edgevlm.kernels.attention(..., backend='torch')"
    assert q.dim() == 4 and q.shape == k.shape == v.shape, (
        f"q, k, v must be (B, heads, N, head_dim) of one shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
        f"{tuple(v.shape)}"
    )
    assert q.dtype == k.dtype == v.dtype and q.dtype in SUPPORTED_DTYPES, (
        f"q, k, v must share a dtype in {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}"
    )
    assert q.device == k.device == v.device == kv_num_blocks.device == kv_indices.device, (
        "q, k, v and the mask indices must be on one device"
    )
    assert q.is_cuda or triton_interpreting(), "the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)"
    b, h, n, hd = q.shape
    assert hd in SUPPORTED_HEAD_DIMS, f"head_dim {hd} not supported; use one of {SUPPORTED_HEAD_DIMS}"
    assert block >= 16 and block & (block - 1) == 0, f"block must be a power of two >= 16, got {block}"
    nqb = -(-n // block)
    assert kv_num_blocks.dtype == torch.int32 and kv_indices.dtype == torch.int32, "mask indices must be int32"
    assert kv_num_blocks.dim() == 2 and kv_indices.dim() == 3, "kv_num_blocks (B, nQB), kv_indices (B, nQB, nKB)"
    assert kv_num_blocks.shape[0] in (1, b) and kv_indices.shape[0] == kv_num_blocks.shape[0], (
        f"mask batch {kv_num_blocks.shape[0]} must be 1 or {b}"
    )
    assert kv_num_blocks.shape[1] == nqb and kv_indices.shape[1] == nqb and kv_indices.shape[2] == nqb, (
        f"mask has {tuple(kv_indices.shape[1:])} blocks but N={n}, block={block} needs ({nqb}, {nqb})"
    )
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device, "out must match q"

    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(hd)
    qk_scale = scale * 1.4426950408889634  # log2(e): the kernel uses exp2
    # fp32 inputs: exact fp32 dots (tf32 would cost ~3e-4 relative error, over the 1e-4 budget).
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    mask_batch_stride = 0 if kv_num_blocks.shape[0] == 1 else 1  # broadcast one mask over the batch

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_M"]), b * h)

    _sparse3d_fwd_kernel[grid](
        q, k, v, out,
        kv_num_blocks, kv_indices,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        kv_num_blocks.stride(0) * mask_batch_stride, kv_num_blocks.stride(1),
        kv_indices.stride(0) * mask_batch_stride, kv_indices.stride(1), kv_indices.stride(2),
        h, n, qk_scale,
        HEAD_DIM=hd, MASK_BLOCK=block, EVEN_N=(n % block == 0), DOT_PRECISION=dot_precision,
        DOT_UPCAST=(q.dtype == torch.bfloat16 and triton_interpreting()),
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------
# Reference and the ONNX-exportable formulation
# ----------------------------------------------------------------------------------------------------
def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: SparseSpec, sm_scale: float | None = None
) -> torch.Tensor:
    """SDPA with the boolean token mask; rows with no allowed key are set to zero explicitly.
    Pass float64 q, k, v for a test reference."""
    mask = spec.token_mask().to(q.device)  # (B or 1, 1, N, N)
    row_any = mask.any(dim=-1, keepdim=True)  # (B or 1, 1, N, 1)
    # Empty rows attend everywhere inside SDPA, then are zeroed: no NaN in the forward or the backward
    # on any SDPA backend (fully masked rows are backend-dependent there).
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~row_any, scale=sm_scale)
    return torch.where(row_any, out, torch.zeros((), dtype=out.dtype, device=out.device))


def attention_blocks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: SparseSpec, sm_scale: float | None = None
) -> torch.Tensor:
    """The mask's attention computed over the visited key blocks only (the CPU inference path).

    The reference scores all N x N pairs and masks most of them, which on a CPU made sparse3d slower than
    dense SDPA (measured at 513 tokens, block 64: 2.6 vs 2.2 ms an attention layer). Here each run of
    consecutive query blocks that visit the same key blocks gets one unmasked SDPA over those keys (views
    when they are contiguous, a gather otherwise), from the kernel's index form. Empty rows are zero.
    """
    b, _, n, _ = q.shape
    blk = spec.block
    kv_num, kv_idx = spec.indices(q.device)  # (1 or B, nQB), (1 or B, nQB, nKB)
    kv_num, kv_idx = kv_num.tolist(), kv_idx.tolist()
    out = torch.empty_like(q)
    for bi in range(b):
        row = bi if len(kv_num) > 1 else 0
        keys = [tuple(kv_idx[row][qb][: kv_num[row][qb]]) for qb in range(len(kv_num[row]))]  # ascending
        qb = 0
        while qb < len(keys):
            end = qb + 1
            while end < len(keys) and keys[end] == keys[qb]:
                end += 1
            q0, q1 = qb * blk, min(end * blk, n)
            if not keys[qb]:
                out[bi, :, q0:q1] = 0
            else:
                # 4-D operands: SDPA on (heads, L, hd) took 1.7x longer here (0.20 vs 0.12 ms a block).
                spans = _token_spans(keys[qb], blk, n)
                ks, vs = (_gather_spans(x[bi: bi + 1], spans) for x in (k, v))
                out[bi: bi + 1, :, q0:q1] = F.scaled_dot_product_attention(q[bi: bi + 1, :, q0:q1], ks, vs,
                                                                           scale=sm_scale)
            qb = end
    return out


def _gather_spans(x: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """(1, heads, N, hd) -> the tokens of `spans` along N: a view for one span, one copy for several."""
    if len(spans) == 1:
        return x[:, :, spans[0][0]:spans[0][1]]
    return torch.cat([x[:, :, s0:s1] for s0, s1 in spans], dim=2)


def _token_spans(blocks: tuple[int, ...], block: int, n: int) -> list[tuple[int, int]]:
    """Ascending key blocks -> maximal [start, stop) token ranges, clipped to the N real tokens."""
    spans: list[tuple[int, int]] = []
    for kb in blocks:
        start, stop = kb * block, min((kb + 1) * block, n)
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], stop)
        else:
            spans.append((start, stop))
    return spans


def attention_onnx(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: SparseSpec, sm_scale: float | None = None
) -> torch.Tensor:
    """Standard-ops formulation for ONNX export: MatMul, Where(-inf), Softmax, Where(0), MatMul.
    The static part of the mask becomes a constant; the foreground part is computed in the graph."""
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    mask = spec.token_mask().to(q.device)  # (B or 1, 1, N, N)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 (fp64 stays fp64)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(acc_dtype) * scale  # (B, heads, N, N)
    row_any = mask.any(dim=-1, keepdim=True)  # (B or 1, 1, N, 1)
    # Rows with no allowed key attend everywhere here (no all -inf softmax, so no NaN, forward or
    # backward) and are zeroed below.
    scores = torch.where(mask | ~row_any, scores, torch.full((), float("-inf"), dtype=acc_dtype, device=q.device))
    p = torch.softmax(scores, dim=-1)
    p = torch.where(row_any, p, torch.zeros((), dtype=p.dtype, device=q.device))
    return torch.matmul(p.to(v.dtype), v)


def _kernel_takes(q: torch.Tensor, spec: SparseSpec) -> bool:
    return (
        q.shape[-1] in SUPPORTED_HEAD_DIMS
        and q.dtype in SUPPORTED_DTYPES
        and spec.block >= 16
        and spec.block & (spec.block - 1) == 0
    )


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


@torch.compiler.disable  # torch.compile graph-breaks around the launch instead of tracing autotune
def _attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: SparseSpec,
                      sm_scale: float | None) -> torch.Tensor:  # fmt: skip
    kv_num, kv_idx = spec.indices(q.device)
    return sparse3d_attention_triton(q, k, v, kv_num.to(q.device), kv_idx.to(q.device), spec.block, sm_scale)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: SparseSpec,
    sm_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sparse volumetric attention; q, k, v (B, heads, N, head_dim) with N = spec.n_tokens.

    backend: "auto" (ONNX formulation while exporting; the reference whenever gradients are needed, since
    the kernel is forward-only: distillation trains through SDPA with the same mask; for inference Triton
    on CUDA and the visited-blocks path on the CPU), "triton", "torch" (SDPA + boolean mask), "onnx"
    (standard ops) or "blocks" (one SDPA per run of query blocks over its visited key blocks).
    """
    assert q.shape[-2] == spec.n_tokens, (
        f"q has {q.shape[-2]} tokens but grid {spec.grid} with {spec.n_global} global tokens has {spec.n_tokens}"
    )
    if backend == "auto":
        if _exporting():
            backend = "onnx"
        elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            backend = "torch"  # forward-only kernel; the reference is differentiable
        elif q.is_cuda and HAS_TRITON and _kernel_takes(q, spec):
            backend = "triton"
        elif not q.is_cuda:
            backend = "blocks"
        else:
            # Correct but dense-cost: say so (once per call site), with the reason and the fix.
            why = "triton is not installed" if not HAS_TRITON else (
                f"the kernel takes head_dim in {SUPPORTED_HEAD_DIMS}, dtype in {SUPPORTED_DTYPES} and a "
                f"power-of-two block >= 16; got head_dim={q.shape[-1]}, dtype={q.dtype}, block={spec.block}"
            )
            warnings.warn(f"sparse3d attention on CUDA falls back to SDPA with a dense boolean mask: {why}",
                          stacklevel=2)  # fmt: skip
            backend = "torch"
    if backend == "triton":
        return _attention_triton(q, k, v, spec, sm_scale)
    if backend == "torch":
        return attention_reference(q, k, v, spec, sm_scale)
    if backend == "onnx":
        return attention_onnx(q, k, v, spec, sm_scale)
    if backend == "blocks":
        return attention_blocks(q, k, v, spec, sm_scale)
    raise ValueError(f"unknown attention backend {backend!r}; use 'auto', 'triton', 'torch', 'onnx' or 'blocks'")
