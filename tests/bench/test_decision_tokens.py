"""benchmarks/decision_tokens.py: it must read the decision at the right token of each impression line,
and its summary must tell "ranked well but under-called" apart from "not seen"."""

from __future__ import annotations

import numpy as np

from edgevlm.data import sample_study
from edgevlm.data.reports import report_text
from edgevlm.models.tokenizer import train_tokenizer


def test_decision_positions_land_on_each_impression_answer(benchmark_script):
    dt = benchmark_script("decision_tokens")
    reports = [report_text(sample_study(seed), np.random.default_rng(seed)) for seed in range(60)]
    tok = train_tokenizer(reports, 600)
    checked_present = 0
    for seed, report in enumerate(reports[:20]):
        text = " " + report
        enc = tok.encode(text, add_special_tokens=False)
        positions = dt.decision_positions(text, enc.offsets)
        present_types = {f.type for f in sample_study(seed).findings}
        assert [p for _, p in positions] == [kind in present_types for kind, _ in dt._IMPRESSION_SLOTS]
        for (j, present), (_, label) in zip(positions, dt._IMPRESSION_SLOTS, strict=True):
            # The token just before is the label's colon; the token itself starts the answer word.
            assert tok.decode(enc.ids[j - 1:j]).endswith(":"), (label, tok.decode(enc.ids[j - 1:j]))
            answer = text[enc.offsets[j][0]:].lstrip()
            assert answer.startswith("none") != present, (label, answer[:20])
            checked_present += present
    assert checked_present >= 5  # the seeds include positive lines, not only "none"


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
