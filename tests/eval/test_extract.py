from __future__ import annotations

import numpy as np
import pytest

from edgevlm.data import Finding, report_text, sample_study
from edgevlm.data.findings import sorted_findings
from edgevlm.eval import extract_findings


def _keys(findings):
    return [f.key() for f in sorted_findings(findings)]


def test_generated_reports_round_trip():
    # Many seeds x phrasings: every template and synonym the generator writes.
    for seed in range(400):
        spec = sample_study(seed)
        for k in range(2):
            report = report_text(spec, np.random.default_rng([seed, k]))
            assert _keys(extract_findings(report)) == _keys(spec.findings), report


def F(t, **kw):
    return Finding(t, **kw)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No pleural effusion.", []),
        ("There is no evidence of consolidation.", []),
        ("Lungs are clear without focal consolidation, pleural effusion or pneumothorax.", []),
        ("Pneumothorax is not seen.", []),
        ("Heart size is normal. No pericardial effusion.", []),
        ("The heart is not enlarged.", []),
        ("Small left pleural effusion without pneumothorax.", [F("pleural_effusion", side="left", severity="small")]),
        (
            "No pneumothorax, but there is a small right effusion.",
            [F("pleural_effusion", side="right", severity="small")],
        ),
        (
            "No pneumothorax and a large right pleural effusion.",
            [F("pleural_effusion", side="right", severity="large")],
        ),
        ("Moderate pleural effusions.", [F("pleural_effusion", side="bilateral", severity="moderate")]),
        ("Small right and small left pleural effusions.", [F("pleural_effusion", side="bilateral", severity="small")]),
        ("A 1.2 x 0.8 cm nodule in the RUL.", [F("nodule", lobe="RUL", size_mm=12)]),
        ("Solid 7mm nodule, lingula.", [F("nodule", lobe="LUL", size_mm=7, density="solid")]),
        (
            "Two nodules in the left lower lobe measuring 5 mm and 7 mm.",
            [F("nodule", lobe="LLL", size_mm=5), F("nodule", lobe="LLL", size_mm=7)],
        ),
        (
            "Solid nodules in the right upper lobe (8 mm) and left lower lobe (12 mm).",
            [F("nodule", lobe="RUL", size_mm=8, density="solid"), F("nodule", lobe="LLL", size_mm=12, density="solid")],
        ),
        (
            "There is a 12 mm solid nodule in the right upper lobe and a 9 mm ground glass nodule"
            " in the left lower lobe.",
            [
                F("nodule", lobe="RUL", size_mm=12, density="solid"),
                F("nodule", lobe="LLL", size_mm=9, density="ground-glass"),
            ],
        ),
        ("3 nodules in the right middle lobe.", [F("nodule", lobe="RML")] * 3),
        (
            "An 8 mm nodule in the right upper lobe. The right upper lobe nodule is solid.",
            [F("nodule", lobe="RUL", size_mm=8)],
        ),
        ("No change in the 6 mm left upper lobe nodule.", [F("nodule", lobe="LUL", size_mm=6)]),
        ("A 4.5 cm mass in the left upper lobe with no pleural effusion.", [F("mass", lobe="LUL", size_mm=45)]),
        (
            "Airspace consolidation of the right middle and lower lobes.",
            [F("consolidation", lobe="RML"), F("consolidation", lobe="RLL")],
        ),
        (
            "Right lower lobe consolidation; small left pneumothorax.",
            [F("consolidation", lobe="RLL"), F("pneumothorax", side="left")],
        ),
        ("Enlarged heart. Emphysematous changes of both lungs.", [F("cardiomegaly"), F("emphysema")]),
    ],
)
def test_paraphrases_and_negations(text, expected):
    assert _keys(extract_findings(text)) == _keys(expected)


def test_impression_adds_only_what_findings_did_not_cover():
    report = (
        "FINDINGS:\nLungs: 8 mm solid nodule in the right upper lobe. No pneumothorax.\n\n"
        "IMPRESSION:\n1. Right upper lobe nodule.\n2. Cardiomegaly.\n3. Left pneumothorax.\n"
    )
    got = extract_findings(report)
    # The nodule is not counted twice; the pneumothorax the FINDINGS denied stays denied.
    assert _keys(got) == _keys([F("nodule", lobe="RUL", size_mm=8, density="solid"), F("cardiomegaly")])


@pytest.mark.parametrize(
    ("findings", "impression", "expected"),
    [
        # the side only the impression gives (what the demo teacher writes): a left effusion, as a reader takes it
        ("Pleura: Moderate-sized pleural effusion with adjacent compressive atelectasis. No pneumothorax.",
         "Pleural effusion: moderate, left.", [F("pleural_effusion", side="left", severity="moderate")]),
        ("There is a solid nodule.", "Pulmonary nodules: 9 mm solid, left upper lobe.",
         [F("nodule", lobe="LUL", size_mm=9, density="solid")]),
        # the sections disagree on an attribute both state: not one finding, nothing is filled
        ("Moderate-sized pleural effusion.", "Pleural effusion: large, right.",
         [F("pleural_effusion", severity="moderate")]),
        ("Small left pleural effusion.", "Pleural effusion: small, right.",
         [F("pleural_effusion", side="left", severity="small")]),
        # two nodules below, one above: which one it describes is unknown, nothing is filled
        ("Two solid nodules.", "Pulmonary nodules: 9 mm solid, left upper lobe.",
         [F("nodule", density="solid"), F("nodule", density="solid")]),
        # the impression denies what the findings state: the findings stand, unfilled
        ("Moderate pleural effusion.", "Pleural effusion: none.", [F("pleural_effusion", severity="moderate")]),
    ],
)
def test_impression_fills_attributes_the_findings_leave_unstated(findings, impression, expected):
    got = extract_findings(f"FINDINGS:\n{findings}\n\nIMPRESSION:\n{impression}\n")
    assert _keys(got) == _keys(expected)
    assert [(f.side, f.severity, f.lobe, f.size_mm) for f in sorted_findings(got)] == [
        (f.side, f.severity, f.lobe, f.size_mm) for f in sorted_findings(expected)]


def test_structured_impression_alone_round_trips():
    """The structured IMPRESSION lines ("Pneumothorax: none.", "Pulmonary nodules: 9 mm solid, left upper
    lobe; ...") carry every finding with its attributes on their own, so a report cut short after them
    still scores what it says."""
    from edgevlm.data.reports import impression_text

    for seed in range(300):
        spec = sample_study(seed)
        assert _keys(extract_findings("IMPRESSION:\n" + impression_text(spec))) == _keys(spec.findings), seed


def test_structured_lines_and_section_headings():
    text = ("Pneumothorax: none.\nLung mass: 31 mm, right upper lobe.\nPleural effusion: small, bilateral.\n"
            "Lungs and airways: No consolidation.\nCardiomegaly: absent.\nEmphysema: none seen.\n"
            "Pulmonary nodules: 19 mm solid, left lower lobe; 9 mm solid, left lower lobe.")
    assert _keys(extract_findings(text)) == _keys([
        F("mass", side="right", lobe="RUL", size_mm=31.0),
        F("pleural_effusion", side="bilateral", severity="small"),
        F("nodule", side="left", lobe="LLL", size_mm=19.0, density="solid"),
        F("nodule", side="left", lobe="LLL", size_mm=9.0, density="solid"),
    ])
