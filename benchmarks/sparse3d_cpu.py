"""Sparse volumetric attention on the CPU: the visited-blocks path vs the masked reference vs dense SDPA.

    python benchmarks/sparse3d_cpu.py [--repeats 7] [--threads 2]

The GPU kernel has its own benchmark (benchmarks/kernels.py); this one times what `edgevlm infer
--backend torch` runs on a CPU. Per shape, in one loop so all three see the same machine load: dense
SDPA (no mask: the cost sparse attention must beat), the reference (SDPA with the N x N boolean mask,
what the CPU ran before the blocks path) and `attention_blocks` (one SDPA per run of query blocks over
its visited key blocks). Error: the blocks path in fp32 against the reference in float64 (small
shapes) or fp32 (large ones, where a float64 N x N pass would take minutes). Prints a table and
writes benchmarks/results/sparse3d_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from edgevlm.kernels import SparseSpec, attention_blocks, attention_reference

from edgevlm.bench.fingerprint import environment
from edgevlm.checkpoint import atomic_write

# name, grid, n_global, radius, block, heads, head_dim, foreground fraction
SHAPES = [
    ("demo-small ViT (8x8x8 + CLS, block 64)", (8, 8, 8), 1, 1, 64, 3, 64, 0.625),
    ("8x16x16 + CLS, block 128", (8, 16, 16), 1, 1, 128, 12, 64, 0.6),
    ("16x32x32 + CLS, block 128", (16, 32, 32), 1, 1, 128, 2, 64, 0.6),
]
FLOAT64_MAX_TOKENS = 4096


def elapsed_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def bench_shape(name, grid, n_global, radius, block, heads, head_dim, p_fg, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    cells = grid[0] * grid[1] * grid[2]
    spec = SparseSpec(grid, n_global, radius, block, torch.rand(1, cells, generator=gen) < p_fg)
    q, k, v = (torch.randn(1, heads, spec.n_tokens, head_dim, generator=gen) for _ in range(3))
    ref_dtype = torch.float64 if spec.n_tokens <= FLOAT64_MAX_TOKENS else torch.float32
    ref = attention_reference(q.to(ref_dtype), k.to(ref_dtype), v.to(ref_dtype), spec).double()
    out = attention_blocks(q, k, v, spec).double()
    row = {
        "shape": name, "grid": list(grid), "n_tokens": spec.n_tokens, "block": block, "radius": radius,
        "heads": heads, "head_dim": head_dim, "foreground_fraction": p_fg, "block_density": round(spec.density(), 4),
        "max_abs_err": float((out - ref).abs().max()), "reference_dtype": str(ref_dtype).replace("torch.", ""),
    }
    times = {"dense_ms": [], "reference_ms": [], "blocks_ms": []}
    fns = {"dense_ms": lambda: F.scaled_dot_product_attention(q, k, v),
           "reference_ms": lambda: attention_reference(q, k, v, spec),
           "blocks_ms": lambda: attention_blocks(q, k, v, spec)}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):  # interleaved: one repeat of each per round
        for key, fn in fns.items():
            times[key].append(elapsed_ms(fn))
    row.update({key: round(statistics.median(ts), 3) for key, ts in times.items()})
    row["blocks_vs_reference"] = round(row["reference_ms"] / row["blocks_ms"], 2)
    row["blocks_vs_dense"] = round(row["dense_ms"] / row["blocks_ms"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sparse3d_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench_shape(*shape, repeats=args.repeats) for shape in SHAPES]
    print(f"{'shape':40s} {'density':>8s} {'dense ms':>9s} {'ref ms':>9s} {'blocks ms':>10s} "
          f"{'vs ref':>7s} {'vs dense':>9s} {'max err':>9s}")
    for r in rows:
        print(f"{r['shape']:40s} {r['block_density']:8.3f} {r['dense_ms']:9.2f} {r['reference_ms']:9.2f} "
              f"{r['blocks_ms']:10.2f} {r['blocks_vs_reference']:6.2f}x {r['blocks_vs_dense']:8.2f}x "
              f"{r['max_abs_err']:9.1e}")
    result = {"benchmark": "sparse3d_cpu", "threads": args.threads, "repeats": args.repeats, "rows": rows,
              "environment": environment(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    print(json.dumps({"benchmark": "sparse3d_cpu", "blocks_vs_dense": [r["blocks_vs_dense"] for r in rows]}))


if __name__ == "__main__":
    main()
