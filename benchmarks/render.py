"""Time the synthetic chest CT phantom: seconds per study point-sampled at the demo model grid, as the
training set renders it (`edgevlm.train.render_spec`: sub-sampled for partial volume, then
preprocessed), and at the native series geometry (what `studies make-synthetic` and eval render).

    python benchmarks/render.py [--studies 6] [--repeats 3]

Prints a table and writes benchmarks/results/render.json (median seconds per study per geometry, with
the machine). The first render of a study warms the lattice cache, as training does; it is not timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from edgevlm.bench.fingerprint import environment
from edgevlm.data import render_volume, sample_study
from edgevlm.models import PRESETS
from edgevlm.preprocess import RECIPES
from edgevlm.train import render_spec

DEMO = RECIPES["demo-chest"]  # the demo models' grid and spacing
TINY = PRESETS["demo-tiny"]()


def time_renders(geometry: str, studies: int, repeats: int) -> dict:
    per_study = []
    shapes = []
    for seed in range(studies):
        spec = sample_study(seed)
        shape, spacing = ((DEMO.grid, DEMO.spacing_mm) if geometry != "native"
                          else (spec.native_shape_zyx, spec.native_spacing_mm))
        def render(spec=spec, shape=shape, spacing=spacing) -> None:
            if geometry == "training":
                render_spec(spec, TINY)
            else:
                render_volume(spec, shape, spacing)

        render()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            render()
            times.append(time.perf_counter() - t0)
        per_study.append(statistics.median(times))
        shapes.append(list(shape))
    return {"geometry": geometry, "median_s_per_study": round(statistics.median(per_study), 4),
            "max_s_per_study": round(max(per_study), 4), "median_voxels": int(np.median([np.prod(s) for s in shapes])),
            "studies": studies, "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "render.json")
    args = parser.parse_args()
    rows = [time_renders(g, args.studies, args.repeats) for g in ("demo grid", "training", "native")]
    print(f"{'geometry':<10} {'median s/study':>15} {'max s/study':>12} {'median voxels':>14}")
    for r in rows:
        print(f"{r['geometry']:<10} {r['median_s_per_study']:>15.4f} {r['max_s_per_study']:>12.4f} "
              f"{r['median_voxels']:>14,}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "render", "results": rows,
                                    "machine": {"platform": platform.platform(), "cpu": environment()["cpu"]},
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
