from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgevlm.data import Finding, questions, report_text, sample_study
from edgevlm.eval import closed_accuracy, evaluate_predictions, lexical_metrics, open_answer_correct, score_findings


def F(t, **kw):
    return Finding(t, **kw)


def test_score_findings_known_numbers():
    truth = [
        [F("nodule", lobe="RUL", size_mm=8, density="solid"), F("pleural_effusion", side="left", severity="small")],
        [],
        [F("nodule", lobe="LLL", size_mm=12), F("nodule", lobe="RUL", size_mm=6)],
        [F("pneumothorax", side="right")],
    ]
    pred = [
        [F("nodule", lobe="RUL", size_mm=10, density="solid"), F("pleural_effusion", side="right", severity="small")],
        [F("cardiomegaly")],
        [F("nodule", lobe="RUL", size_mm=7), F("nodule", lobe="LUL", size_mm=12)],
        [],
    ]
    s = score_findings(pred, truth)
    # Hand count: nodules 3 TP; the wrong-side effusion is 1 FP + 1 FN; cardiomegaly 1 FP; pneumothorax 1 FN.
    assert s["per_type"]["nodule"] == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 3, "fp": 0, "fn": 0, "support": 3}
    )
    assert (s["per_type"]["pleural_effusion"]["fp"], s["per_type"]["pleural_effusion"]["fn"]) == (1, 1)
    assert s["per_type"]["cardiomegaly"]["fp"] == 1 and s["per_type"]["pneumothorax"]["fn"] == 1
    assert s["micro"]["precision"] == pytest.approx(0.6)
    assert s["micro"]["recall"] == pytest.approx(0.6)
    assert s["micro"]["f1"] == pytest.approx(0.6)
    assert s["macro_types"]["f1"] == pytest.approx(0.25)  # nodule 1, effusion/cardiomegaly/pneumothorax 0
    assert s["macro_studies"]["f1"] == pytest.approx((0.5 + 0.0 + 1.0 + 0.0) / 4)
    assert s["normal_accuracy"] == pytest.approx(0.5)
    assert s["attributes"]["side"] == {"accuracy": pytest.approx(0.75), "n": 4}
    assert s["attributes"]["lobe"] == {"accuracy": pytest.approx(2 / 3), "n": 3}
    assert s["attributes"]["severity"] == {"accuracy": 1.0, "n": 1}
    assert s["attributes"]["density"] == {"accuracy": 1.0, "n": 1}
    assert s["nodule_size_mae_mm"] == pytest.approx(1.0)  # |10-8|, |7-6|, |12-12|
    json.dumps(s)


def test_score_findings_perfect_and_empty():
    truth = [[F("emphysema")], []]
    s = score_findings(truth, truth)
    assert s["micro"]["f1"] == 1.0 and s["macro_studies"]["f1"] == 1.0 and s["normal_accuracy"] == 1.0
    with pytest.raises(ValueError):
        score_findings([[]], [])


def test_closed_accuracy_normalisation():
    yn = ["yes", "no"]
    qas = [
        {"question": "q", "answer": "yes", "kind": "closed", "finding_type": "nodule", "choices": yn},
        {"question": "q", "answer": "no", "kind": "closed", "finding_type": "pneumothorax", "choices": yn},
        {
            "question": "q",
            "answer": "left",
            "kind": "closed",
            "finding_type": "pneumothorax",
            "choices": ["left", "right"],
        },
        {
            "question": "q",
            "answer": "bilateral",
            "kind": "closed",
            "finding_type": "pleural_effusion",
            "choices": ["left", "right", "bilateral"],
        },
        {
            "question": "q",
            "answer": "ground-glass",
            "kind": "closed",
            "finding_type": "nodule",
            "choices": ["solid", "ground-glass"],
        },
        {
            "question": "q",
            "answer": "right upper lobe",
            "kind": "closed",
            "finding_type": "consolidation",
            "choices": [
                "right upper lobe",
                "right middle lobe",
                "right lower lobe",
                "left upper lobe",
                "left lower lobe",
            ],
        },
        {"question": "q", "answer": "yes", "kind": "closed", "finding_type": "mass", "choices": yn},
        {
            "question": "q",
            "answer": "left",
            "kind": "closed",
            "finding_type": "pleural_effusion",
            "choices": ["left", "right", "bilateral"],
        },
        {"question": "q", "answer": "9 mm", "kind": "open", "finding_type": "nodule", "choices": None},
    ]
    preds = [
        "Yes, there is.",
        "No pneumothorax is seen.",
        "Left-sided.",
        "both sides",
        "Ground glass",
        "RUL",
        "maybe",
        "left and right",
        "whatever",
    ]
    assert closed_accuracy(preds, qas) == pytest.approx(6 / 8)
    assert math.isnan(closed_accuracy([], []))


def test_open_answers():
    assert open_answer_correct("1.1 cm", "12 mm") and open_answer_correct("14mm", "12 mm")
    assert not open_answer_correct("16 mm", "12 mm")
    assert open_answer_correct("In the RUL.", "right upper lobe")
    assert open_answer_correct("two", "2") and not open_answer_correct("3", "2")


def test_lexical_metrics_bounds():
    ref = "There is a small left pleural effusion. No pneumothorax."
    same = lexical_metrics([ref], [ref])
    assert same["bleu1"] == pytest.approx(1.0) and same["bleu4"] == pytest.approx(1.0)
    assert same["rouge_l"] == pytest.approx(1.0) and same["meteor_nosyn"] > 0.99
    other = lexical_metrics(["cardiomegaly"], [ref])
    assert other["bleu1"] == 0.0 and other["rouge_l"] == 0.0 and other["meteor_nosyn"] == 0.0
    part = lexical_metrics(["There is a small right pleural effusion."], [ref])
    assert 0.0 < part["bleu1"] < 1.0 and 0.0 < part["rouge_l"] < 1.0


def test_evaluate_predictions_perfect_model_is_json_ready():
    records = []
    for seed in (1, 2, 5):
        spec = sample_study(seed)
        rng = np.random.default_rng(seed)
        report = report_text(spec, rng)
        qas = [{**q.to_dict(), "prediction": q.answer} for q in questions(spec, rng)]
        records.append(
            {
                "study_id": spec.study_id,
                "predicted_report": report_text(spec, np.random.default_rng(seed + 100)),  # other phrasing
                "reference_report": report,
                "reference_findings": [f.to_dict() for f in spec.findings],
                "qa": qas,
            }
        )
    out = evaluate_predictions(records)
    json.dumps(out)
    assert out["n_studies"] == 3
    assert out["findings"]["micro"]["f1"] == 1.0
    assert out["closed"]["accuracy"] == 1.0 and out["open"]["accuracy"] == 1.0
    assert 0.0 < out["lexical"]["bleu4"] <= 1.0
    assert [s["study_id"] for s in out["studies"]] == ["SYN00001", "SYN00002", "SYN00005"]
    assert all(s["finding_f1"] == 1.0 for s in out["studies"])


def test_section_disagreements_find_a_report_that_contradicts_itself():
    # True reports never do; one whose impression calls a mass its findings deny does, for that type only.
    from edgevlm.eval import section_disagreements

    reports = [report_text(sample_study(s), np.random.default_rng(s)) for s in range(200)]
    assert all(section_disagreements(r) == [] for r in reports)
    clean = next(r for r in reports if "Lung mass: none." in r and "No lung mass." in r)
    contradicting = clean.replace("Lung mass: none.", "Lung mass: 61 mm, right lower lobe.")
    assert section_disagreements(contradicting) == ["mass"]
    assert section_disagreements("No pleural effusion. Large mass in the left upper lobe.") is None
    out = evaluate_predictions([{"predicted_report": r, "reference_report": clean} for r in (clean, contradicting)])
    assert out["self_contradiction"] == {"n_reports": 2, "rate": 0.5, "by_type": {"mass": 1}}
    assert [s["section_disagreements"] for s in out["studies"]] == [[], ["mass"]]
