"""The gate verdict's resolution check: can the gate set tell a 2% F1 loss from one flipped finding?"""

from __future__ import annotations

import numpy as np
from edgevlm.export.gates import judge, one_finding_f1_change, thresholds

from edgevlm.eval.clinical import _prf

PARITY_OK = {"vision_cosine_min": 0.9999, "logit_kl_mean": 0.001, "top1_agreement": 1.0}


def task(tp: int, fp: int, fn: int, n_studies: int) -> dict:
    return {"finding_f1": _prf(tp, fp, fn)["f1"], "closed_accuracy": 0.9, "n_studies": n_studies,
            "n_closed": 4 * n_studies, "tp": tp, "fp": fp, "fn": fn}


def test_one_finding_change_is_the_f1_of_one_lost_true_positive() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        tp, fp, fn = (int(x) for x in rng.integers(1, 300, size=3))
        f1, f1_lost = _prf(tp, fp, fn)["f1"], _prf(tp - 1, fp, fn + 1)["f1"]
        assert np.isclose(one_finding_f1_change(tp, fp, fn), 1 - f1_lost / f1, rtol=1e-12)
    assert one_finding_f1_change(0, 3, 4) == 1.0


def test_small_gate_set_is_flagged_and_a_large_one_is_not() -> None:
    limit = thresholds("int4")  # 98% retention: a 2% tolerance
    # The demo teacher on 50 gate studies: one lost finding is a 4.8% drop, and it failed the gate.
    ref, lost_one = task(17, 30, 26, 50), task(16, 30, 27, 50)
    verdict = judge(PARITY_OK, lost_one, ref, limit)
    assert not verdict["passed"] and not verdict["task"]["resolves_threshold"]
    assert verdict["task"]["one_finding_f1_change"] > 0.02
    [warning] = verdict["warnings"]
    suggested = int(warning.rsplit("about ", 1)[1].split()[0])
    assert suggested >= 50 * verdict["task"]["one_finding_f1_change"] / 0.02
    # With ~3x the true positives the same one-finding loss is inside the tolerance: passes, no warning.
    ref, lost_one = task(60, 100, 90, 200), task(59, 100, 91, 200)
    verdict = judge(PARITY_OK, lost_one, ref, limit)
    assert verdict["passed"] and verdict["task"]["resolves_threshold"] and verdict["warnings"] == []
