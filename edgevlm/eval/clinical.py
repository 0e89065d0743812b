"""Finding-level scores (precision/recall/F1, attribute accuracy, nodule size error) and closed-QA accuracy.

Matching, per study and per finding type:
- Predicted and true findings of one type are paired greedily by cost: side mismatch first, then lobe
  mismatch, then size difference (so nodules pair by lobe, then by size).
- A pair is a true positive, except for lateral findings (pleural effusion, pneumothorax) whose side
  differs: a wrong-side effusion counts as one false positive and one false negative.
- Unpaired predictions are false positives, unpaired truths false negatives.
- Attribute accuracy is measured on every pair where the truth has the attribute: side, lobe,
  severity, density; nodule size error (mm) on nodule pairs where both sides give a size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from edgevlm.data.findings import FINDING_TYPES, LATERAL_TYPES, LOBE_NAMES, NODULE, Finding

_ATTRS = ("side", "lobe", "severity", "density")


def _pair_cost(p: Finding, t: Finding) -> tuple:
    size = abs(p.size_mm - t.size_mm) if p.size_mm is not None and t.size_mm is not None else 1e6
    return (p.side != t.side, p.lobe != t.lobe, size)


def match_findings(pred: Sequence[Finding], truth: Sequence[Finding]) -> list[tuple[Finding, Finding]]:
    """Greedy pairs (pred, truth) of the same type, cheapest first (see module docstring)."""
    pairs = []
    for ftype in FINDING_TYPES:
        ps = [f for f in pred if f.type == ftype]
        ts = [f for f in truth if f.type == ftype]
        cand = sorted(
            ((_pair_cost(p, t), i, j) for i, p in enumerate(ps) for j, t in enumerate(ts)), key=lambda c: c[0]
        )
        used_p, used_t = set(), set()
        for _, i, j in cand:
            if i in used_p or j in used_t:
                continue
            used_p.add(i)
            used_t.add(j)
            pairs.append((ps[i], ts[j]))
    return pairs


def _prf(tp: int, fp: int, fn: int) -> dict:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def score_findings(predicted: Sequence[Sequence[Finding]], truth: Sequence[Sequence[Finding]]) -> dict:
    """Finding scores over studies (lists aligned by study). JSON-ready.

    Returns per_type P/R/F1 (with tp/fp/fn and support), micro (pooled counts), macro_types (mean
    over types that occur in truth or predictions), macro_studies (mean per-study F1; a study with
    no true and no predicted finding scores 1), normal_accuracy (study called normal iff it is),
    attributes {side, lobe, severity, density: {accuracy, n}}, nodule_size_mae_mm (and n).
    Precision/recall with an empty denominator are 0.
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted studies but {len(truth)} true studies")
    counts = {t: [0, 0, 0] for t in FINDING_TYPES}  # tp, fp, fn
    attr_hits = {a: [0, 0] for a in _ATTRS}  # correct, total
    type_attr_hits: dict[str, dict[str, list[int]]] = {}  # per finding type, e.g. side/lobe of nodules
    size_err: list[float] = []
    study_f1: list[float] = []
    normal_ok = 0
    for pred, true in zip(predicted, truth, strict=True):
        pairs = match_findings(pred, true)
        s_tp = 0
        for p, t in pairs:
            if t.type in LATERAL_TYPES and p.side != t.side:
                counts[t.type][1] += 1
                counts[t.type][2] += 1
            else:
                counts[t.type][0] += 1
                s_tp += 1
            for a in _ATTRS:
                if getattr(t, a) is not None:
                    attr_hits[a][0] += getattr(p, a) == getattr(t, a)
                    attr_hits[a][1] += 1
                    hits = type_attr_hits.setdefault(t.type, {}).setdefault(a, [0, 0])
                    hits[0] += getattr(p, a) == getattr(t, a)
                    hits[1] += 1
            if t.type == NODULE and p.size_mm is not None and t.size_mm is not None:
                size_err.append(abs(p.size_mm - t.size_mm))
        paired_p = {id(p) for p, _ in pairs}
        paired_t = {id(t) for _, t in pairs}
        for p in pred:
            if id(p) not in paired_p:
                counts[p.type][1] += 1
        for t in true:
            if id(t) not in paired_t:
                counts[t.type][2] += 1
        s_fp = len(pred) - s_tp
        s_fn = len(true) - s_tp
        study_f1.append(1.0 if not pred and not true else _prf(s_tp, s_fp, s_fn)["f1"])
        normal_ok += (not pred) == (not true)

    per_type = {}
    for t, (tp, fp, fn) in counts.items():
        per_type[t] = {**_prf(tp, fp, fn), "support": tp + fn}
    active = [v for v in per_type.values() if v["support"] or v["fp"]]
    micro = _prf(*(sum(c[i] for c in counts.values()) for i in range(3)))
    n = len(truth)
    return {
        "n_studies": n,
        "per_type": per_type,
        "micro": micro,
        "macro_types": {
            k: (sum(v[k] for v in active) / len(active) if active else 0.0) for k in ("precision", "recall", "f1")
        },
        "macro_studies": {"f1": sum(study_f1) / n if n else 0.0},
        "normal_accuracy": normal_ok / n if n else 0.0,
        "attributes": {a: {"accuracy": (c / m if m else None), "n": m} for a, (c, m) in attr_hits.items()},
        "attributes_by_type": {
            t: {a: {"accuracy": c / m, "n": m} for a, (c, m) in sorted(hits.items())}
            for t, hits in sorted(type_attr_hits.items())
        },
        "nodule_size_mae_mm": (sum(size_err) / len(size_err)) if size_err else None,
        "nodule_size_n": len(size_err),
    }


# -- closed questions ---------------------------------------------------------------------------------
_SYNONYMS = [
    (r"\bground glass\b|\bggo\b|\bggn\b|\bnon-?solid\b|\bsubsolid\b", "ground-glass"),
    (r"\bboth(?: sides| lungs)?\b|\bbilaterally\b", "bilateral"),
    (r"\b(left|right)-sided\b|\b(left|right) side\b", r"\1\2"),
    (r"\bmoderate-sized\b", "moderate"),
    (r"\blarge-volume\b", "large"),
    (r"\b(?:yeah|yep|true|positive|present|correct)\b", "yes"),
    (r"\b(?:nope|false|negative|absent|none)\b", "no"),
]
_LOBE_ABBREV = {k.lower(): v for k, v in LOBE_NAMES.items()}


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation (hyphens kept), synonyms mapped: 'Yes.' -> 'yes', 'RUL' -> 'right upper lobe'."""
    t = text.lower().strip()
    t = re.sub(r"[^\w\s-]", " ", t)
    for rx, rep in _SYNONYMS:
        t = re.sub(rx, rep, t)
    t = " ".join(_LOBE_ABBREV.get(w, w) for w in t.split())
    return re.sub(r"\s+", " ", t).strip()


def map_to_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The one choice a free-text answer gives ('Yes, there is.' -> 'yes'), or None when unclear."""
    pred = normalize_answer(prediction)
    norm = {normalize_answer(c): c for c in choices}
    if pred in norm:
        return norm[pred]
    if set(norm) == {"yes", "no"}:
        # The first word decides ("no pneumothorax is seen" -> "no", "yes, no doubt" -> "yes").
        first = pred.split(" ", 1)[0] if pred else ""
        if first in norm:
            return norm[first]
    # Otherwise exactly one choice must be named ("left and right" for left/right/bilateral is unclear).
    found = [c for nc, c in norm.items() if re.search(rf"(?<![\w-]){re.escape(nc)}(?![\w-])", pred)]
    return found[0] if len(found) == 1 else None


def closed_accuracy(pred_answers: Sequence[str], qas: Sequence) -> float:
    """Accuracy over the closed questions of `qas` (aligned with `pred_answers`); NaN if there are none.

    Answers are normalised and mapped onto the question's choices (yes/no when it has none), so
    'Yes, there is a small effusion.' counts as 'yes' and 'RUL' as 'right upper lobe'.
    """
    if len(pred_answers) != len(qas):
        raise ValueError(f"{len(pred_answers)} answers for {len(qas)} questions")
    right = total = 0
    for pred, qa in zip(pred_answers, qas, strict=True):
        kind = qa["kind"] if isinstance(qa, dict) else qa.kind
        if kind != "closed":
            continue
        answer = qa["answer"] if isinstance(qa, dict) else qa.answer
        choices = (qa.get("choices") if isinstance(qa, dict) else qa.choices) or ["yes", "no"]
        got = map_to_choice(pred, choices)
        right += got is not None and normalize_answer(got) == normalize_answer(answer)
        total += 1
    return right / total if total else math.nan
