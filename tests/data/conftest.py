from __future__ import annotations

import pytest

from edgevlm.data import StudySpec, sample_study
from edgevlm.data.findings import Finding


def spec_with(seed: int, findings: list[Finding]) -> StudySpec:
    """A study with the anatomy of `seed` but exactly `findings` (geometry taken from sampled ones)."""
    spec = sample_study(seed)
    spec.findings = findings
    return spec


@pytest.fixture
def normal_spec() -> StudySpec:
    spec = sample_study(3)
    spec.findings = []
    spec.anatomy.heart_ctr = 0.42
    return spec
