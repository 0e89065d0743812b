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


def test_side_summary_tells_reading_the_side_from_guessing_it(benchmark_script):
    dt = benchmark_script("decision_tokens")
    rng = np.random.default_rng(1)
    truths = ["left", "right"] * 20 + ["bilateral"] * 4

    def row(truth: str, p_left: float) -> dict:
        return {"truth": truth, "left": p_left, "right": 0.9 - p_left, "bilateral": 0.1}

    read = [row(t, 0.8 if t == "left" else 0.1) for t in truths]  # bilateral rows lean left: wrong side
    guessed = [row(t, float(rng.uniform(0.0, 0.9))) for t in truths]
    out = dt.summarize_sides({"Pleural effusion:": read, "Pneumothorax:": guessed})
    effusion, pneumothorax = out["Pleural effusion:"], out["Pneumothorax:"]
    assert (effusion["n"], effusion["n_left"], effusion["n_right"]) == (44, 20, 20)
    assert effusion["left_vs_right_auc"] == 1.0 and effusion["side_accuracy"] == round(40 / 44, 3)
    assert abs(pneumothorax["left_vs_right_auc"] - 0.5) < 0.2 and pneumothorax["side_accuracy"] < 0.8
