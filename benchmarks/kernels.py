"""Benchmark edgevlm.kernels on one CUDA GPU: build, check against a reference, time, report.

    python benchmarks/kernels.py [--out-dir benchmarks/results] [--quick]
    python benchmarks/kernels.py --smoke-cpu   # CPU, Triton interpreter, tiny shapes: checks the script

On the workplace's device tool: `python3 benchmarks/kernels.py --out-dir $OUT` (about 4-6 minutes).

On a machine without CUDA it checks that the kernels import, says CUDA is required, and exits 0.
Designed to run end to end in a few minutes on an H200 (budget guard: rows past --budget-s seconds
are skipped and marked so). Prints one table, then one JSON line; writes the full record to
<out-dir>/kernels-<gpu>.json with the device name and library versions.

What it measures (every speed row sits next to a correctness check; inputs are random, never zeros):
1. Ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 8192^3 matmul rate.
2. Fused patch embedding (int16 HU volume -> fp16 tokens, + bias + pos) vs the unfused PyTorch path
   and vs cuDNN Conv3d (normalize + conv + flatten + pos), on M3D-LaMed shapes (B x 32x256x256, patch
   4x16x16, dim 768, B = 1..16) and Med3DVLM-size volumes (128x256x256). Achieved bandwidth = (volume
   + weight + bias + pos bytes read + token bytes written) / time, against the measured copy bandwidth;
   also TFLOP/s, since at dim 768 this GEMM has ~300-450 FLOP/byte, above the H200's ~180-200
   FLOP/byte ridge: the arithmetic floor, not the byte floor, bounds it (see the 'floor' column).
   Targets: >= 70 % of copy bandwidth at B >= 8 (unreachable if the arithmetic floor dominates; the
   table says which) and >= 3x the unfused path.
3. Sparse attention (Triton, this repo) vs dense SDPA (flash backend) and vs FlexAttention with the
   same block mask (BlockMask.from_kv_blocks on our index form), 2k-32k tokens, densities ~5-50 %,
   fp16, 12 heads x 64. TFLOP/s counted on the visited blocks (4 * B * H * pairs * block^2 * hd).
   Targets: speedup over dense >= 0.8 / density at 16k tokens; not slower than FlexAttention.

Predictions written before any GPU run (compare the first run against them; explain misses):
- Patch embedding, M3D B=8: 26 GFLOP and ~58 MB, so the floor is the matmul (~33 us at 790 TFLOP/s)
  not the bytes (~14 us at 4.3 TB/s): at most ~41 % of copy bandwidth even at the full matmul rate,
  so the 70 % bandwidth target cannot be met by any kernel; expect 20-30 %. Unfused: ~330 MB of
  elementwise traffic + the cuBLAS GEMM, ~110-130 us; fused at 50-65 % of the matmul rate ~50-65 us:
  ~2x, short of 3x unless the fused GEMM reaches ~650 TFLOP/s.
- Sparse attention, 16k tokens, r=1 (~6 % density): dense flash ~2 ms (824 GFLOP); sparse ~50 GFLOP
  at 200-300 TFLOP/s ~0.17-0.25 ms: 8-12x against a 13x target; at 25-50 % density the target
  (1.6-3.2x) should be met. Flex with the same full blocks: within +-20 % of ours.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# --smoke-cpu runs every code path of this script on the CPU through Triton's interpreter, at tiny
# sizes, so the script is known to work before a GPU lease is spent on it. The interpreter is chosen
# when the kernels are defined, so the variable must be set before they are imported.
SMOKE = "--smoke-cpu" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
DEV = "cpu" if SMOKE else "cuda"


def _import_kernels():
    """edgevlm.kernels, also from a plain checkout where the package is not installed (device machines):
    kernels/ is mapped to edgevlm.kernels by setuptools' package-dir, so mimic that mapping."""
    try:
        import edgevlm.kernels as kernels
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import edgevlm

        edgevlm.__path__.append(str(ROOT))  # edgevlm.kernels -> ROOT/kernels
        import edgevlm.kernels as kernels
    return kernels


K = _import_kernels()
from edgevlm.kernels import mask3d  # noqa: E402
from edgevlm.kernels.patch_embed import patch_embed_triton, patch_embed_unfused  # noqa: E402
from edgevlm.kernels.sparse3d import sparse3d_attention_triton  # noqa: E402

T0 = time.time()


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def bench(fn, rep_ms: int = 100) -> dict:
    """Median (and p20/p80) milliseconds with CUDA events; warm-up first; L2 flushed between runs."""
    import triton.testing

    if SMOKE:  # the interpreter: one timed call is all the smoke run needs
        t = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t) * 1e3
        return {"ms": ms, "p20_ms": ms, "p80_ms": ms}
    fn()
    torch.cuda.synchronize()
    med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "p20_ms": p20, "p80_ms": p80}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def check_cuda(label: str) -> None:
    """Synchronize so an asynchronous launch error surfaces at the row that caused it, named."""
    if SMOKE:
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as e:
        raise RuntimeError(f"CUDA error after {label}: {e}") from e


def empty_cache() -> None:
    if not SMOKE:
        torch.cuda.empty_cache()


def over_budget(args) -> bool:
    return time.time() - T0 > args.budget_s


# ----------------------------------------------------------------------------------------------------
# 1. ceilings
# ----------------------------------------------------------------------------------------------------
def measure_ceilings() -> dict:
    def copy_bw() -> tuple[dict, float]:
        numel = 1 << 20 if SMOKE else 1 << 29  # 2 GiB: many times the 60 MB L2
        src = torch.randn(numel, device=DEV, dtype=torch.float32)
        dst = torch.empty_like(src)
        t = bench(lambda: dst.copy_(src))
        assert torch.equal(dst, src), "copy check failed"
        return t, 2 * src.numel() * src.element_size() / (t["ms"] * 1e-3) / 1e9

    def matmul_rate() -> tuple[dict, float]:
        n = 256 if SMOKE else 8192
        a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)  # random data: zeros run faster
        b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
        t = bench(lambda: a @ b)
        return t, 2 * n**3 / (t["ms"] * 1e-3) / 1e12

    t, copy_gbs = copy_bw()
    t_mm, mm_tflops = matmul_rate()
    empty_cache()
    return {"copy_GBps": copy_gbs, "matmul_bf16_TFLOPs": mm_tflops, "copy_ms": t["ms"], "matmul_ms": t_mm["ms"]}


# ----------------------------------------------------------------------------------------------------
# 2. patch embedding
# ----------------------------------------------------------------------------------------------------
def conv3d_path(vol, conv_w, bias, pos, patch, window):
    """cuDNN Conv3d patchify from the raw volume: normalize -> conv -> (B, N, dim) -> + pos."""
    from edgevlm.kernels.patch_embed import normalize_intensity

    x = normalize_intensity(vol.float(), window).half()
    t = torch.nn.functional.conv3d(x, conv_w, bias, stride=patch)  # (B, dim, gd, gh, gw)
    return t.flatten(2).transpose(1, 2) + pos  # (B, N, dim)


def bench_patch_embed(args, ceil: dict) -> list[dict]:
    from edgevlm.kernels.patch_embed import IntensityWindow

    torch.backends.cudnn.benchmark = True
    rows = []
    patch, dim = (4, 16, 16), 768
    window = IntensityWindow(-1000.0, 1000.0)
    cases = [("M3D-LaMed", (32, 256, 256), b) for b in ((1, 8) if args.quick else (1, 2, 4, 8, 16))]
    cases += [("Med3DVLM-size", (128, 256, 256), b) for b in ((1,) if args.quick else (1, 4, 8))]
    if SMOKE:
        patch, dim, cases = (2, 4, 4), 48, [("smoke", (4, 8, 12), 2)]
    k_len = patch[0] * patch[1] * patch[2]
    weight = (torch.randn(dim, k_len, device=DEV) / math.sqrt(k_len)).half()
    bias = torch.randn(dim, device=DEV).half()
    conv_w = weight.view(dim, *patch, 1).permute(0, 4, 1, 2, 3).contiguous()  # (dim, C, pd, ph, pw)
    assert torch.equal(K.conv_weight_to_linear(conv_w), weight)
    for name, dhw, b in cases:
        if over_budget(args):
            rows.append({"case": name, "B": b, "skipped": "time budget"})
            continue
        grid = tuple(s // p for s, p in zip(dhw, patch, strict=True))
        n_tok = grid[0] * grid[1] * grid[2]
        vol = torch.randint(-1024, 3000, (b, 1, *dhw), device=DEV, dtype=torch.int16)
        pos = (torch.randn(1, n_tok, dim, device=DEV) * 0.02).half()

        def fused(vol=vol, pos=pos):
            return patch_embed_triton(vol, weight, bias, pos, patch, window)

        def unfused(vol=vol, pos=pos):
            return patch_embed_unfused(vol, weight, bias, pos, patch, window, torch.float16)

        def conv(vol=vol, pos=pos):
            return conv3d_path(vol, conv_w, bias, pos, patch, window)

        # Checks on the first (up to) two volumes against float64 on the GPU.
        nb = min(b, 2)
        ref = patch_embed_unfused(vol[:nb], weight, bias, pos, patch, window, torch.float64)
        out = torch.full((b, n_tok, dim), float("nan"), device=DEV, dtype=torch.float16)
        patch_embed_triton(vol, weight, bias, pos, patch, window, out=out)
        check_cuda("patch_embed")
        errs = {
            "fused": rel_err(out[:nb], ref),
            "unfused": rel_err(unfused()[:nb], ref),
            "conv3d": rel_err(conv()[:nb], ref),
        }
        nan_free = not bool(torch.isnan(out).any())
        del ref, out

        t = {"fused": bench(fused), "unfused": bench(unfused), "conv3d": bench(conv)}
        bytes_moved = (
            vol.numel() * vol.element_size()
            + weight.numel() * 2
            + bias.numel() * 2
            + pos.numel() * 2
            + b * n_tok * dim * 2
        )
        flops = 2 * b * n_tok * k_len * dim
        s = t["fused"]["ms"] * 1e-3
        floor_bytes_ms = bytes_moved / (ceil["copy_GBps"] * 1e9) * 1e3
        floor_flops_ms = flops / (ceil["matmul_bf16_TFLOPs"] * 1e12) * 1e3
        row = {
            "case": name,
            "volume": list(dhw),
            "B": b,
            "tokens": n_tok,
            "times": t,
            "rel_err": errs,
            "all_written": nan_free,
            "ok": nan_free and errs["fused"] <= 1e-2,
            "bytes": bytes_moved,
            "GBps": bytes_moved / s / 1e9,
            "pct_copy_bw": 100 * bytes_moved / s / 1e9 / ceil["copy_GBps"],
            "TFLOPs": flops / s / 1e12,
            "pct_matmul": 100 * flops / s / 1e12 / ceil["matmul_bf16_TFLOPs"],
            "floor_ms": max(floor_bytes_ms, floor_flops_ms),
            "floor_bound": "bytes" if floor_bytes_ms >= floor_flops_ms else "flops",
            "speedup_vs_unfused": t["unfused"]["ms"] / t["fused"]["ms"],
            "speedup_vs_conv3d": t["conv3d"]["ms"] / t["fused"]["ms"],
        }
        row["target_bw_70pct"] = (row["pct_copy_bw"] >= 70) if b >= 8 else None
        row["target_3x_unfused"] = row["speedup_vs_unfused"] >= 3
        rows.append(row)
        del vol, pos, fused, unfused, conv
        empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------
# 3. sparse attention
# ----------------------------------------------------------------------------------------------------
def sampled_reference_check(q, k, v, out, spec, n_rows: int = 256) -> float:
    """float64 attention for a random sample of query rows (a full N x N reference at 32k tokens would
    not fit), with the exact token mask rows from mask3d; empty rows -> 0."""
    n, hd = q.shape[-2:]
    rows = torch.randperm(n, device=q.device)[:n_rows].sort().values
    bm = spec.block_mask().to(q.device)  # (B|1, nQB, nKB)
    tb = torch.arange(n, device=q.device) // spec.block
    mask = bm[:, tb[rows]][:, :, tb].unsqueeze(1)  # (B|1, 1, R, N)
    s = q[:, :, rows].double() @ k.double().transpose(-1, -2) / math.sqrt(hd)  # (B, H, R, N)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # empty rows -> 0
    ref = p @ v.double()
    return rel_err(out[:, :, rows], ref)


def block_mask_mod(bm: torch.Tensor, block: int):
    """FlexAttention mask_mod reading a (B, nQB, nKB) block mask per token."""

    def mask_mod(b, h, q_idx, kv_idx):
        return bm[b, q_idx // block, kv_idx // block]

    return mask_mod


def choose_radii(grid, block, targets) -> list[tuple[int, float]]:
    """Radius per target density (closest), deduplicated; densities from the mask itself."""
    dens = {}
    for r in range(0, max(grid)):
        dens[r] = float(mask3d.local_block_mask(grid, 0, r, block).float().mean())
        if dens[r] >= max(targets) + 0.15:
            break
    picked = []
    for t in targets:
        r = min(dens, key=lambda r: abs(dens[r] - t))
        if r not in [p[0] for p in picked] and 0.02 <= dens[r] <= 0.6:
            picked.append((r, dens[r]))
    return picked


def bench_attention(args) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        # Compiled, as FlexAttention is meant to be used (eager is a slow reference path); eager in smoke.
        flex = flex_attention if SMOKE else torch.compile(flex_attention, dynamic=False)
        # One compile per shape is expected (5 grids); keep dynamo from falling back to eager Flex,
        # which materializes the N x N scores.
        knob = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    except Exception as e:  # FlexAttention missing in this torch: report, keep the other columns
        print(f"FlexAttention unavailable ({type(e).__name__}: {e}); its column stays empty")
        flex, BlockMask = None, None

    rows = []
    heads, hd, block, dtype = 12, 64, 128, torch.float16
    grids = [(8, 16, 16), (16, 16, 16), (8, 32, 32), (16, 32, 32), (32, 32, 32)]
    if args.quick:
        grids = [(8, 16, 16), (16, 32, 32)]
    fg_tokens = 16384  # where the foreground row is added
    if SMOKE:
        heads, hd, block, grids, fg_tokens = 2, 16, 16, [(4, 4, 8)], 128
    targets = (0.05, 0.1, 0.25, 0.5)
    for grid in grids:
        n = grid[0] * grid[1] * grid[2]
        b = max(1, 16384 // n) if not SMOKE else 2  # keep the GPU busy at small N (2k tokens: batch 8)
        q, k, v = (torch.randn(b, heads, n, hd, device=DEV, dtype=dtype) for _ in range(3))
        t_dense = None
        if not over_budget(args):
            with sdpa_kernel(SDPBackend.MATH if SMOKE else SDPBackend.FLASH_ATTENTION):
                t_dense = bench(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
        specs = [(r, d, None) for r, d in choose_radii(grid, block, targets)]
        if n == fg_tokens:  # plus a body-like foreground: an ellipsoid, air outside (the foreground rule)
            z, y, x = torch.meshgrid(*(torch.linspace(-1, 1, g) for g in grid), indexing="ij")
            body = ((z / 1.1) ** 2 + (y / 0.8) ** 2 + (x / 0.9) ** 2 <= 1).flatten()[None].expand(b, -1)
            specs.append((1, None, body.to(DEV)))
        for radius, _, fg in specs:
            if over_budget(args):
                rows.append({"tokens": n, "radius": radius, "skipped": "time budget"})
                continue
            spec = mask3d.SparseSpec(grid, 0, radius, block, fg)
            bm = spec.block_mask().to(DEV)
            density = float(bm.float().mean())
            kv_num, kv_idx = mask3d.block_indices(bm)
            pairs = int(bm.sum()) * (b if bm.shape[0] == 1 else 1)
            flops_visited = 4 * heads * pairs * block * block * hd

            out = torch.full_like(q, float("nan"))
            sparse3d_attention_triton(q, k, v, kv_num, kv_idx, block, out=out)
            check_cuda("sparse3d")
            err = sampled_reference_check(q, k, v, out, spec)
            def sparse(q=q, k=k, v=v, kv_num=kv_num, kv_idx=kv_idx):
                return sparse3d_attention_triton(q, k, v, kv_num, kv_idx, block)

            t_sparse = bench(sparse)

            t_flex, err_flex = None, None
            if flex is not None:
                try:
                    # Our index form as FlexAttention "full" blocks: the compiled kernel visits exactly
                    # these blocks and applies no mask_mod inside them (our granularity), and there
                    # are no partial blocks, so its mask_mod is never called: None (no-op) keeps one
                    # compile per shape. Flex's eager path (smoke run) evaluates mask_mod on every
                    # token instead, so there it must be the block mask read per token. Either way
                    # err_flex below checks Flex against our kernel. Batch expanded: one mask per b.
                    bm_b = bm.expand(b, -1, -1).contiguous()
                    kvn_b, kvi_b = mask3d.block_indices(bm_b)
                    bmask = BlockMask.from_kv_blocks(
                        torch.zeros_like(kvn_b)[:, None],
                        kvi_b[:, None],
                        full_kv_num_blocks=kvn_b[:, None],
                        full_kv_indices=kvi_b[:, None],
                        BLOCK_SIZE=block,
                        mask_mod=block_mask_mod(bm_b, block) if SMOKE else None,
                    )
                    flex_out = flex(q, k, v, block_mask=bmask)
                    err_flex = rel_err(flex_out, out)
                    t_flex = bench(lambda q=q, k=k, v=v, bmask=bmask: flex(q, k, v, block_mask=bmask))
                except Exception as e:  # keep the run going: a Flex failure is a finding, not a crash
                    print(f"FlexAttention failed at N={n}, r={radius}: {type(e).__name__}: {str(e)[:200]}")
            s = t_sparse["ms"] * 1e-3
            row = {
                "tokens": n,
                "grid": list(grid),
                "B": b,
                "heads": heads,
                "head_dim": hd,
                "block": block,
                "radius": radius,
                "foreground": fg is not None,
                "density": density,
                "times": {"sparse": t_sparse, "dense_flash": t_dense, "flex": t_flex},
                "rel_err_vs_f64_sampled": err,
                "rel_err_flex_vs_ours": err_flex,
                # Flex disagreeing with our kernel would void the comparison: it fails the row too.
                "ok": not math.isnan(err) and err <= 1e-2 and not bool(torch.isnan(out).any())
                and (err_flex is None or err_flex <= 1e-2),
                "TFLOPs_visited": flops_visited / s / 1e12,
                "speedup_vs_dense": None if t_dense is None else t_dense["ms"] / t_sparse["ms"],
                "speedup_vs_flex": None if t_flex is None else t_flex["ms"] / t_sparse["ms"],
            }
            if n == 16384 and row["speedup_vs_dense"] is not None:
                row["target_dense_0.8_over_density"] = row["speedup_vs_dense"] >= 0.8 / density
            if row["speedup_vs_flex"] is not None:
                row["target_not_slower_than_flex"] = row["speedup_vs_flex"] >= 1.0
            rows.append(row)
            del out
        del q, k, v
        empty_cache()
    return rows


def small_correctness_sweep() -> list[dict]:
    """The ragged/global/foreground/empty-row paths on the GPU at small sizes, full float64 reference."""
    res = []
    grid, block, head_dims = ((2, 3, 5), 16, (16,)) if SMOKE else ((5, 7, 9), 64, (64, 128))  # N ragged
    cells = grid[0] * grid[1] * grid[2]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for hd in head_dims:
            fg = torch.rand(2, cells, device=DEV) < 0.2
            for n_global, f in ((1, None), (1, fg), (0, fg)):
                spec = mask3d.SparseSpec(grid, n_global, 1, block, f)
                q, k, v = (torch.randn(2, 3, spec.n_tokens, hd, device=DEV, dtype=dtype) for _ in range(3))
                kv_num, kv_idx = spec.indices(DEV)
                out = torch.full_like(q, float("nan"))
                sparse3d_attention_triton(q, k, v, kv_num.to(DEV), kv_idx.to(DEV), block, out=out)
                ref = K.attention_reference(q.double(), k.double(), v.double(), spec)
                err = rel_err(out, ref)
                tol = 1e-4 if dtype == torch.float32 else 1e-2
                res.append({"dtype": str(dtype), "head_dim": hd, "n_global": n_global, "foreground": f is not None,
                            "rel_err": err, "ok": not math.isnan(err) and err <= tol})  # fmt: skip
    return res


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------
def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(ceil, pe_rows, at_rows, sweep) -> None:
    print(f"\nceilings: copy {ceil['copy_GBps']:.0f} GB/s (read+write), "
          f"bf16 matmul {ceil['matmul_bf16_TFLOPs']:.0f} TFLOP/s")  # fmt: skip
    print("\npatch embedding, int16 volume -> fp16 tokens, patch 4x16x16, dim 768 (times: median ms)")
    print(f"{'case':<14}{'B':>3}{'fused':>9}{'unfused':>9}{'conv3d':>9}{'GB/s':>7}{'%copy':>7}{'TFLOP/s':>8}"
          f"{'%mm':>5}{'floor':>8}{'x unf':>7}{'x conv':>7}{'err':>9}  ok")  # fmt: skip
    for r in pe_rows:
        if "skipped" in r:
            print(f"{r['case']:<14}{r['B']:>3}  skipped ({r['skipped']})")
            continue
        t = r["times"]
        print(
            f"{r['case']:<14}{r['B']:>3}{t['fused']['ms']:>9.3f}{t['unfused']['ms']:>9.3f}{t['conv3d']['ms']:>9.3f}"
            f"{r['GBps']:>7.0f}{r['pct_copy_bw']:>7.1f}{r['TFLOPs']:>8.0f}{r['pct_matmul']:>5.0f}"
            f"{r['floor_ms']:>7.3f}{r['floor_bound'][0]}{r['speedup_vs_unfused']:>7.2f}{r['speedup_vs_conv3d']:>7.2f}"
            f"{r['rel_err']['fused']:>9.1e}  {'ok' if r['ok'] else 'FAIL'}"
        )
    print("\nsparse attention fp16, 12 heads x 64, block 128 (times: median ms; TFLOP/s on visited blocks)")
    print(f"{'N':>6}{'B':>3}{'r':>3}{'fg':>3}{'dens':>7}{'sparse':>9}{'dense':>9}{'flex':>9}{'TFLOP/s':>8}"
          f"{'x dense':>8}{'0.8/d':>7}{'x flex':>7}{'err':>9}  ok")  # fmt: skip
    for r in at_rows:
        if "skipped" in r:
            print(f"{r['tokens']:>6}   r={r['radius']} skipped ({r['skipped']})")
            continue
        t = r["times"]
        print(
            f"{r['tokens']:>6}{r['B']:>3}{r['radius']:>3}{'y' if r['foreground'] else 'n':>3}{r['density']:>7.3f}"
            f"{t['sparse']['ms']:>9.3f}{fmt(t['dense_flash'] and t['dense_flash']['ms'], '.3f'):>9}"
            f"{fmt(t['flex'] and t['flex']['ms'], '.3f'):>9}{r['TFLOPs_visited']:>8.0f}"
            f"{fmt(r['speedup_vs_dense']):>8}{0.8 / r['density']:>7.2f}{fmt(r['speedup_vs_flex']):>7}"
            f"{r['rel_err_vs_f64_sampled']:>9.1e}  {'ok' if r['ok'] else 'FAIL'}"
        )
    bad = [s for s in sweep if not s["ok"]]
    print(f"\nsmall GPU correctness sweep (ragged N, globals, foreground, empty rows): {len(sweep) - len(bad)}/"
          f"{len(sweep)} ok" + ("" if not bad else f"; failing: {bad}"))  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip remaining rows after this many seconds")
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny shapes on the CPU via TRITON_INTERPRET=1")
    args = ap.parse_args()

    if not torch.cuda.is_available() and not SMOKE:
        assert callable(K.patch_embed) and callable(K.volumetric_attention)
        print(f"edgevlm.kernels imports (triton available: {K.HAS_TRITON}); CUDA is required to benchmark. Exit 0.")
        return 0
    assert K.HAS_TRITON, "triton is required on the GPU: pip install triton"

    import triton

    if SMOKE:
        name, extra = f"cpu-smoke-{platform.machine()}", {}
    else:
        props = torch.cuda.get_device_properties(0)
        name = props.name
        extra = {"sm_count": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
                 "memory_GiB": props.total_memory / 2**30}  # fmt: skip
    env = {
        "device": name,
        **extra,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
    }
    print(json.dumps(env))
    ceil = measure_ceilings()
    print(f"[{time.time() - T0:.0f}s] ceilings {ceil}")
    sweep = small_correctness_sweep()
    print(f"[{time.time() - T0:.0f}s] correctness sweep done")
    pe_rows = bench_patch_embed(args, ceil)
    print(f"[{time.time() - T0:.0f}s] patch embedding done")
    at_rows = bench_attention(args)
    print(f"[{time.time() - T0:.0f}s] attention done")

    print_table(ceil, pe_rows, at_rows, sweep)
    record = {"env": env, "ceilings": ceil, "patch_embed": pe_rows, "attention": at_rows,
              "correctness_sweep": sweep, "wall_s": time.time() - T0}  # fmt: skip
    ok = all(r.get("ok", True) for r in pe_rows + at_rows + sweep)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = out_dir / f"kernels-{slug}.json"
    path.write_text(json.dumps(record, indent=1))
    summary = {
        "device": name,
        "ok": ok,
        "json": str(path),
        "pe_best_pct_copy_bw_B>=8": max((r["pct_copy_bw"] for r in pe_rows if r.get("B", 0) >= 8 and "times" in r),
                                        default=None),
        "pe_min_speedup_vs_unfused": min((r["speedup_vs_unfused"] for r in pe_rows if "times" in r), default=None),
        "attn_16k": [(round(r["density"], 3), round(r["speedup_vs_dense"] or 0, 2), round(0.8 / r["density"], 2),
                      r["speedup_vs_flex"] and round(r["speedup_vs_flex"], 2))
                     for r in at_rows if r.get("tokens") == 16384 and "times" in r],
        "wall_s": round(time.time() - T0, 1),
    }  # fmt: skip
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
