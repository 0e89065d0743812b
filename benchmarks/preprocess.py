"""Time `preprocess` on a 300 x 512 x 512 CT-like phantom with each preset.

    python benchmarks/preprocess.py [--repeats 7]

Prints a table and writes benchmarks/results/preprocess.json (median and min of the repeats, in
seconds, with the machine and library versions). The phantom is generated here: air around a body
ellipse of soft tissue with noise, -3024 HU outside the scan circle as scanners write it.

Side by side, for the antialiased demo-chest recipe (also on a z-flipped series, which must be
reoriented): the plain order the slab-wise path replaced (clip the whole volume, torch's area
resize, trilinear), timed in the same loop, with the largest output difference between the two.
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
import torch.nn.functional as F

from edgevlm.preprocess import (
    RECIPES,
    _affine,
    _crop_pad,
    box_average_shape,
    preprocess,
    reorient,
    resampled_shape,
)
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


def plain_order(volume: Volume, recipe) -> np.ndarray:
    """The straightforward antialiased path: every step on the whole volume (flip, clip, area, trilinear)."""
    x, spacing = reorient(torch.from_numpy(volume.array), volume.direction, volume.spacing_mm, recipe.orientation)
    x = x.clamp(*recipe.window)
    size = resampled_shape(tuple(x.shape), spacing, recipe.spacing_mm)
    v = F.interpolate(x[None, None], size=box_average_shape(tuple(x.shape), size), mode="area")
    x = F.interpolate(v, size=size, mode="trilinear", align_corners=False)[0, 0]
    x = _crop_pad(_affine(_crop_pad(x, recipe.grid, None), recipe.window, recipe), recipe.grid, recipe.pad_value)
    return x.numpy()


def side_by_side(volume: Volume, repeats: int) -> dict:
    recipe = RECIPES["demo-chest"]
    fns = {"slab_wise": lambda: preprocess(volume, recipe), "plain": lambda: plain_order(volume, recipe)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():  # alternating, so both see the same machine load
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_ms": {k: round(v * 1e3, 1) for k, v in med.items()},
            "speedup": round(med["plain"] / med["slab_wise"], 2),
            "max_abs_diff": float(np.abs(fns["slab_wise"]() - fns["plain"]()).max())}


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

    flipped = Volume(np.ascontiguousarray(volume.array[::-1]), SPACING_MM, direction=np.diag([1.0, 1.0, -1.0]))
    compare = {"as stored": side_by_side(volume, args.repeats), "z-flipped": side_by_side(flipped, args.repeats)}

    print(f"preprocess of a {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} float32 volume, spacing {SPACING_MM} mm, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'recipe':<12} {'output (D,H,W)':<16} {'median s':>9} {'min s':>8}")
    for r in rows:
        print(f"{r['recipe']:<12} {'x'.join(map(str, r['output_shape'])):<16} {r['median_s']:>9.3f} {r['min_s']:>8.3f}")
    print(f"\ndemo-chest, slab-wise vs plain order (same loop)\n{'series':<10} {'slab-wise ms':>13} {'plain ms':>9} "
          f"{'speedup':>8} {'max |diff|':>11}")
    for k, c in compare.items():
        print(f"{k:<10} {c['median_ms']['slab_wise']:>13.1f} {c['median_ms']['plain']:>9.1f} {c['speedup']:>7.2f}x "
              f"{c['max_abs_diff']:>11.2e}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "input_shape_zyx": list(SHAPE),
        "input_spacing_mm_zyx": list(SPACING_MM),
        "results": rows,
        "demo_chest_slab_wise_vs_plain": compare,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "numpy": np.__version__},
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
