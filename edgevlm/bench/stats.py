"""Percentiles and sample summaries, one method everywhere.

Percentiles use linear interpolation between closest ranks (numpy's default `method="linear"`,
Hyndman-Fan type 7): for sorted x[0..n-1], the q-th percentile sits at rank h = (n - 1) * q / 100 and is
x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] - x[floor(h)]). MLPerf's LoadGen instead takes the
sample at a rank (no interpolation); with the few dozen samples of a study set the two can differ by a
sample's spacing, so the method is written into every results.json.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

PERCENTILE_METHOD = "linear interpolation between closest ranks (numpy 'linear', Hyndman-Fan type 7)"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) of `values` by linear interpolation; None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q, method="linear"))


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, std (sample, ddof=1), min, p25, p50, p75, p90, p99, max of `values` (None where undefined)."""
    x = [float(v) for v in values if v is not None and math.isfinite(v)]
    out: dict[str, Any] = {"n": len(x)}
    if not x:
        return out | dict.fromkeys(("mean", "std", "min", "p25", "p50", "p75", "p90", "p99", "max"))
    out["mean"] = float(np.mean(x))
    out["std"] = float(np.std(x, ddof=1)) if len(x) > 1 else 0.0
    out["min"] = min(x)
    for q in (25, 50, 75, 90, 99):
        out[f"p{q}"] = percentile(x, q)
    out["max"] = max(x)
    return out
