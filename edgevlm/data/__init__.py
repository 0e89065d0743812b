"""Synthetic chest CT studies: sampled specs, a procedural phantom, reports, questions and DICOM."""

from edgevlm.data.findings import FINDING_TYPES, LOBE_NAMES, LOBES, Finding
from edgevlm.data.phantom import render_volume
from edgevlm.data.reports import QA, ground_truth, questions, report_text
from edgevlm.data.spec import StudySpec, SyntheticConfig, default_origin_mm, sample_study

__all__ = [
    "FINDING_TYPES",
    "LOBES",
    "LOBE_NAMES",
    "QA",
    "Finding",
    "StudySpec",
    "SyntheticConfig",
    "default_origin_mm",
    "ground_truth",
    "questions",
    "render_volume",
    "report_text",
    "sample_study",
]
