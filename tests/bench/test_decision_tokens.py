"""benchmarks/decision_tokens.py: its summary must tell "ranked well but under-called" apart from "not seen"
(where it reads the decisions, `edgevlm.eval.operating_points.decision_positions`, is tested in tests/eval)."""

from __future__ import annotations

import numpy as np


def test_summary_separates_under_calling_from_not_seeing(benchmark_script):
    dt = benchmark_script("decision_tokens")
    rng = np.random.default_rng(0)
    n, k = 400, len(dt._IMPRESSION_SLOTS)
    truth = rng.random((n, k)) < 0.2
    p = rng.random((n, k)) * 0.3  # type 0 unseen: P(positive) is noise below 0.3 either way
    p[:, 1] = np.where(truth[:, 1], 0.35, 0.05) + rng.random(n) * 0.1  # type 1: ranked, but under 0.5
    p[:, 2] = np.where(truth[:, 2], 0.9, 0.1)  # type 2: ranked and called
    out = dt.summarize(p, truth, p > 0.5)
    kinds = [kind for kind, _ in dt._IMPRESSION_SLOTS]
    unseen, under, called = out[kinds[0]], out[kinds[1]], out[kinds[2]]
    assert abs(unseen["auc"] - 0.5) < 0.1 and unseen["greedy_recall"] == 0.0
    assert under["auc"] == 1.0 and under["greedy_recall"] == 0.0 and under["p_above_half_recall"] == 0.0
    assert called["auc"] == 1.0 and called["greedy_recall"] == 1.0 and called["greedy_fpr"] == 0.0
    assert under["n_positive"] == int(truth[:, 1].sum())
