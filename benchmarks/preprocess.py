"""Time `preprocess` on a 300 x 512 x 512 CT-like phantom with each preset.

    python benchmarks/preprocess.py [--repeats 7]

Prints a table and writes benchmarks/results/preprocess.json (median and min of the repeats, in
seconds, with the machine and library versions). The phantom is generated here: air around a body
ellipse of soft tissue with noise, -3024 HU outside the scan circle as scanners write it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from edgevlm.preprocess import RECIPES, preprocess
from edgevlm.volume import Volume

SHAPE = (300, 512, 512)
SPACING_MM = (1.0, 0.7, 0.7)


def ct_phantom(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    rng = np.random.default_rng(0)
    _, h, w = shape
    y, x = np.ogrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j]
    plane = np.full((h, w), -1000.0, np.float32)
    plane[(y / 0.6) ** 2 + (x / 0.85) ** 2 < 1] = 40.0
    plane[x**2 + y**2 > 1] = -3024.0
    vol = np.broadcast_to(plane, shape).copy()
    vol += rng.normal(0, 20, shape).astype(np.float32)
    return vol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "preprocess.json")
    args = parser.parse_args()

    volume = Volume(ct_phantom(), SPACING_MM)
    rows = []
    for name, recipe in RECIPES.items():
        preprocess(volume, recipe)  # warm-up: first call pays for thread pools and allocations
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = preprocess(volume, recipe)
            times.append(time.perf_counter() - t0)
        rows.append({
            "recipe": name,
            "output_shape": list(out.shape),
            "median_s": round(statistics.median(times), 4),
            "min_s": round(min(times), 4),
            "repeats": args.repeats,
        })

    print(f"preprocess of a {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} float32 volume, spacing {SPACING_MM} mm, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'recipe':<12} {'output (D,H,W)':<16} {'median s':>9} {'min s':>8}")
    for r in rows:
        print(f"{r['recipe']:<12} {'x'.join(map(str, r['output_shape'])):<16} {r['median_s']:>9.3f} {r['min_s']:>8.3f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "input_shape_zyx": list(SHAPE),
        "input_spacing_mm_zyx": list(SPACING_MM),
        "results": rows,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "numpy": np.__version__},
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
