"""Calibration sets: sources, seeds, the bundle recipe, hashes, no PHI."""

from __future__ import annotations

import numpy as np
import pytest
from edgevlm.calibration import CALIB_SEED_START, GATE_SEED_START, array_sha256, build_calibration_set
from edgevlm.export.testing import tiny_config

from edgevlm.errors import EdgeVLMError
from edgevlm.preprocess import Recipe
from edgevlm.train import HELDOUT_SEED_START


def recipe() -> Recipe:
    return Recipe.from_dict(tiny_config("gqa").preprocess)


def test_seed_ranges_are_disjoint() -> None:
    assert HELDOUT_SEED_START <= GATE_SEED_START < CALIB_SEED_START
    assert CALIB_SEED_START - GATE_SEED_START >= 1_000_000  # room for any eval size


def test_synthetic_set_through_recipe() -> None:
    a = build_calibration_set("synthetic:2", recipe(), progress=False)
    b = build_calibration_set("synthetic:2", recipe(), progress=False)
    assert a.volumes.shape == (2, 1, 8, 16, 16) and a.volumes.dtype == np.float32
    assert a.seeds == [CALIB_SEED_START, CALIB_SEED_START + 1]
    assert a.study_sha256 == b.study_sha256 and a.study_sha256[0] == array_sha256(a.volumes[0, 0])
    assert a.study_sha256[0] != a.study_sha256[1]
    assert a.volumes.min() >= 0.0 and a.volumes.max() <= 1.0  # the recipe's window and out_range
    rec = a.record()
    assert rec["count"] == 2 and rec["recipe"] == "tiny-gqa" and len(rec["studies"]) == 2


def test_folder_set_records_no_names(tmp_path) -> None:
    import nibabel as nib

    for name in ("DOE_JOHN_1970", "ROE_JANE_1980"):  # names in folder names must not reach the record
        d = tmp_path / name
        d.mkdir()
        vol = np.random.default_rng(len(name)).integers(-1000, 400, (20, 20, 10)).astype(np.int16)
        nib.save(nib.Nifti1Image(vol, np.diag([1.5, 1.5, 3.0, 1.0])), str(d / "ct.nii.gz"))
    cal = build_calibration_set(str(tmp_path), recipe(), progress=False)
    assert len(cal) == 2 and cal.seeds is None
    text = str(cal.record())
    assert "DOE" not in text and "ROE" not in text and str(tmp_path) not in text


def test_bad_sources() -> None:
    with pytest.raises(EdgeVLMError, match="synthetic:N"):
        build_calibration_set("synthetic:x", recipe())
    with pytest.raises(EdgeVLMError, match="folder of studies"):
        build_calibration_set("/no/such/folder", recipe())
