"""Agreement of a configuration with the reference (fp32) bundle, and accuracy as a fraction of it.

MLPerf Inference states a compressed model's accuracy as a fraction of the fp32 reference's and sets
two targets, 99% and 99.9% (DESIGN.md decision 9). The metric here is finding micro F1 (the clinical
metric, decision 8), with closed-question accuracy beside it. Token agreement and exact-match rate say
how often the outputs are literally the same, which explains an F1 difference (or its absence).
"""

from __future__ import annotations

from typing import Any

TARGETS = (0.99, 0.999)


def token_agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """(positions equal, positions compared): position i counts as equal when both sequences hold the
    same token there; the longer sequence's tail counts as disagreement."""
    return sum(x == y for x, y in zip(a, b, strict=False)), max(len(a), len(b))


def fraction(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None  # a reference that scores 0 leaves no fraction to state
    return value / reference


def agreement(outputs: list[dict], acc: dict[str, Any] | None, ref_outputs: list[dict] | None,
              ref_acc: dict[str, Any] | None, ref_label: str) -> dict[str, Any] | None:
    """Token agreement, exact-match rate (report and every answer), F1 delta and fractions of reference."""
    if ref_outputs is None:
        return None
    ref = {o["key"]: o for o in ref_outputs}
    equal = compared = exact = n_texts = report_exact = n_reports = 0
    for o in outputs:
        r = ref.get(o["key"])
        if r is None:
            continue
        for i, (ids, ref_ids, text, ref_text) in enumerate(zip(o["token_ids"], r["token_ids"], o["texts"],
                                                               r["texts"], strict=True)):
            e, n = token_agreement(ids, ref_ids)
            equal, compared = equal + e, compared + n
            exact += text == ref_text
            n_texts += 1
            if i == 0:
                report_exact += text == ref_text
                n_reports += 1
    f1 = (acc or {}).get("finding_micro_f1")
    ref_f1 = (ref_acc or {}).get("finding_micro_f1")
    f1_fraction = fraction(f1, ref_f1)
    closed_fraction = fraction((acc or {}).get("closed_accuracy"), (ref_acc or {}).get("closed_accuracy"))
    return {
        "reference": ref_label,
        "n_studies": n_reports,
        "token_agreement": equal / compared if compared else None,
        "exact_match_rate": exact / n_texts if n_texts else None,
        "report_exact_match_rate": report_exact / n_reports if n_reports else None,
        "finding_f1_delta": None if f1 is None or ref_f1 is None else f1 - ref_f1,
        "f1_fraction_of_reference": f1_fraction,
        "closed_fraction_of_reference": closed_fraction,
        "meets_99": None if f1_fraction is None else f1_fraction >= TARGETS[0],
        "meets_99_9": None if f1_fraction is None else f1_fraction >= TARGETS[1],
    }
