"""Model-free evaluation of generated reports and answers: clinical metrics first, lexical second.

`evaluate_predictions(records)` is the one entry point the `edgevlm eval` command calls.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from edgevlm.data.findings import Finding
from edgevlm.eval.clinical import (
    closed_accuracy,
    map_to_choice,
    match_findings,
    normalize_answer,
    score_findings,
)
from edgevlm.eval.extract import extract_findings, extract_mentions, section_disagreements
from edgevlm.eval.lexical import lexical_metrics

__all__ = [
    "Finding",
    "closed_accuracy",
    "evaluate_predictions",
    "extract_findings",
    "extract_mentions",
    "lexical_metrics",
    "map_to_choice",
    "match_findings",
    "normalize_answer",
    "open_answer_correct",
    "score_findings",
    "section_disagreements",
]

OPEN_SIZE_TOLERANCE_MM = 3.0
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(mm|cm)?")


def _size_mm(text: str) -> float | None:
    m = _SIZE.search(text.lower())
    if not m:
        return None
    return float(m.group(1)) * (10.0 if m.group(2) == "cm" else 1.0)


def open_answer_correct(prediction: str, answer: str) -> bool:
    """Open answers: sizes within 3 mm ('12 mm' vs '1.1 cm'), counts and locations by normalised text."""
    if re.search(r"\d\s*(?:mm|cm)\b", answer):
        got, want = _size_mm(prediction), _size_mm(answer)
        return got is not None and want is not None and abs(got - want) <= OPEN_SIZE_TOLERANCE_MM
    p, a = normalize_answer(prediction), normalize_answer(answer)
    words = {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}
    p = " ".join(words.get(w, w) for w in p.split())
    a = " ".join(words.get(w, w) for w in a.split())
    return p == a or re.search(rf"(?<![\w-]){re.escape(a)}(?![\w-])", p) is not None


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else x


def _findings(value: Any) -> list[Finding]:
    return [f if isinstance(f, Finding) else Finding.from_dict(f) for f in value]


def evaluate_predictions(records: Sequence[dict]) -> dict:
    """All metrics for a set of studies, as one JSON-ready dict.

    Each record is a dict:
      study_id: str
      predicted_report: str                      the model's report ("" if not generated)
      reference_report: str                      the ground-truth report (for lexical metrics)
      reference_findings: list[dict] | None      ground-truth findings (Finding.to_dict());
                                                 if absent, extracted from reference_report
      qa: list[dict] (optional)                  QA.to_dict() plus "prediction": the model's answer

    Returns {"n_studies", "findings": score_findings(...), "lexical": lexical_metrics(...),
    "closed": {"accuracy", "n"}, "open": {"accuracy", "n"}, "per_type_closed": {...}, "self_contradiction":
    {"n_reports", "rate", "by_type"} over reports with both sections,
    "studies": [per-study predictions, extracted findings and scores]}.
    """
    pred_findings, true_findings, studies, disagreements = [], [], [], []
    closed_preds, closed_qas, open_right, open_n = [], [], 0, 0
    per_type_closed: dict[str, list[int]] = {}
    for rec in records:
        pred_text = rec.get("predicted_report") or ""
        ref_text = rec.get("reference_report") or ""
        pf = extract_findings(pred_text)
        tf = (
            _findings(rec["reference_findings"])
            if rec.get("reference_findings") is not None
            else extract_findings(ref_text)
        )
        pred_findings.append(pf)
        true_findings.append(tf)
        qa_rows = []
        for qa in rec.get("qa") or []:
            pred = qa.get("prediction") or ""
            if qa["kind"] == "closed":
                closed_preds.append(pred)
                closed_qas.append(qa)
                ok = not math.isnan(closed_accuracy([pred], [qa])) and closed_accuracy([pred], [qa]) == 1.0
                tally = per_type_closed.setdefault(qa.get("finding_type", ""), [0, 0])
                tally[0] += ok
                tally[1] += 1
            else:
                ok = open_answer_correct(pred, qa["answer"])
                open_right += ok
                open_n += 1
            qa_rows.append(
                {
                    "question": qa["question"],
                    "answer": qa["answer"],
                    "prediction": pred,
                    "kind": qa["kind"],
                    "correct": bool(ok),
                }
            )
        single = score_findings([pf], [tf])
        disagree = section_disagreements(pred_text)
        if disagree is not None:
            disagreements.append(disagree)
        studies.append(
            {
                "study_id": rec.get("study_id"),
                "predicted_report": pred_text,
                "predicted_findings": [f.to_dict(with_geometry=False) for f in pf],
                "reference_findings": [f.to_dict(with_geometry=False) for f in tf],
                "finding_f1": single["macro_studies"]["f1"],
                "section_disagreements": disagree,
                "qa": qa_rows,
            }
        )
    have_reports = [r for r in records if r.get("reference_report")]
    lexical = lexical_metrics(
        [r.get("predicted_report") or "" for r in have_reports], [r["reference_report"] for r in have_reports]
    )
    closed = closed_accuracy(closed_preds, closed_qas) if closed_qas else math.nan
    return {
        "n_studies": len(records),
        "findings": score_findings(pred_findings, true_findings),
        "lexical": lexical,
        "closed": {"accuracy": _finite(closed), "n": len(closed_qas)},
        "open": {"accuracy": (open_right / open_n if open_n else None), "n": open_n},
        "per_type_closed": {t: {"accuracy": c / n, "n": n} for t, (c, n) in sorted(per_type_closed.items())},
        # Reports whose FINDINGS and IMPRESSION disagree on a finding type (section_disagreements).
        "self_contradiction": {
            "n_reports": len(disagreements),
            "rate": (sum(bool(d) for d in disagreements) / len(disagreements)) if disagreements else None,
            "by_type": {t: sum(t in d for d in disagreements) for t in sorted({t for d in disagreements for t in d})},
        },
        "studies": studies,
    }
