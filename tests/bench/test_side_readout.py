"""benchmarks/side_readout.py: its leave-one-out ridge AUC finds a side written in the features and only there."""

from __future__ import annotations

import numpy as np


def test_loo_ridge_auc_reads_a_written_side_and_not_noise(benchmark_script):
    sr = benchmark_script("side_readout")
    rng = np.random.default_rng(0)
    n, d = 80, 300
    y = (rng.random(n) < 0.5).astype(np.float64)
    noise = rng.normal(size=(n, d))
    written = noise.copy()
    written[:, :30] += 2.0 * (y[:, None] - 0.5)  # 30 features of 300 say the side
    assert sr.loo_ridge_auc(written, y, 10.0) > 0.95
    assert abs(sr.loo_ridge_auc(noise, y, 10.0) - 0.5) < 0.2
    # Leave-one-out, not in-sample: with more features than studies a fit explains any labels in-sample.
    assert abs(sr.loo_ridge_auc(rng.normal(size=(n, 5000)), y, 1e-3) - 0.5) < 0.2
