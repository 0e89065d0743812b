from __future__ import annotations

import json

import numpy as np

from edgevlm.data import QA, Finding, StudySpec, questions, report_text, sample_study
from edgevlm.data.findings import FINDING_TYPES, LOBES


def test_spec_json_round_trip():
    for seed in range(20):
        spec = sample_study(seed)
        back = StudySpec.from_json(spec.to_json())
        assert back == spec
        assert [f.geometry for f in back.findings] == [f.geometry for f in spec.findings]


def test_sampling_distribution():
    specs = [sample_study(s) for s in range(300)]
    normal = sum(s.is_normal for s in specs) / len(specs)
    assert 0.2 <= normal <= 0.4
    assert all(len(s.findings) <= 3 for s in specs)
    types = {f.type for s in specs for f in s.findings}
    assert types == set(FINDING_TYPES)
    for s in specs:
        assert 1.25 <= s.slice_spacing_mm <= 5.0 and 0.6 <= s.pixel_spacing_mm <= 0.8
        assert 2 * s.anatomy.body_rx_mm < s.cols * s.pixel_spacing_mm  # body fits the field of view
        for f in s.findings:
            if f.type == "nodule":
                assert 6 <= f.size_mm <= 30 and f.lobe in LOBES and f.density in ("solid", "ground-glass")
    assert sample_study(3) == sample_study(3)


def test_report_has_sections_negatives_and_phrasing_varies():
    normal = next(s for s in (sample_study(i) for i in range(50)) if s.is_normal)
    text = report_text(normal, np.random.default_rng(0))
    assert "FINDINGS:" in text and "IMPRESSION:" in text
    assert "pneumothorax" in text.lower() and "pleural effusion" in text.lower()
    variants = {report_text(normal, np.random.default_rng(k)) for k in range(20)}
    assert len(variants) > 10
    nod = Finding("nodule", lobe="RUL", size_mm=12, density="solid", geometry={"center_mm": [0, 0, 0]})
    spec = sample_study(1)
    spec.findings = [nod]
    texts = [report_text(spec, np.random.default_rng(k)) for k in range(30)]
    assert all("right upper lobe" in t for t in texts)
    assert any("12 mm" in t for t in texts) and any("1.2 cm" in t for t in texts)


def test_questions_schema_and_answers():
    spec = sample_study(1)
    spec.findings = [
        Finding("pleural_effusion", side="left", severity="small"),
        Finding("nodule", lobe="LLL", size_mm=9, density="ground-glass", geometry={"center_mm": [0, 0, 0]}),
    ]
    qas = questions(spec, np.random.default_rng(0))
    by_q = {q.question: q for q in qas}
    assert by_q["Which side is the pleural effusion on?"].answer == "left"
    assert by_q["Which side is the pleural effusion on?"].choices == ["left", "right", "bilateral"]
    assert by_q["What is the size of the nodule?"].answer == "9 mm"
    assert by_q["What is the size of the nodule?"].kind == "open"
    assert by_q["Where is the nodule?"].answer == "left lower lobe"
    assert by_q["Is the nodule solid or ground-glass?"].answer == "ground-glass"
    yes_no = [q for q in qas if q.choices == ["yes", "no"]]
    assert {q.answer for q in yes_no} == {"yes", "no"}
    for q in qas:
        assert q.kind in ("closed", "open") and q.finding_type in FINDING_TYPES
        if q.kind == "closed":
            assert q.answer in q.choices
        assert QA.from_dict(json.loads(json.dumps(q.to_dict()))) == q
