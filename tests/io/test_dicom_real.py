"""pydicom's own test files (pydicom and pydicom-data packages, read locally, never downloaded)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from edgevlm.errors import EdgeVLMError
from edgevlm.io import list_series, load_study


def dicomdir_tests(testdata) -> Path:
    return Path(testdata("CT_small.dcm")).parent / "dicomdirtests"


def test_testdata_lookup_is_local(testdata):
    import pydicom.data

    assert Path(testdata("emri_small.dcm")).is_file()
    assert pydicom.data.get_testdata_file("no_such_file_xyz.dcm", download=False) is None


def test_enhanced_mr_multiframe(testdata):
    v = load_study(testdata("emri_small.dcm"))
    ref = pydicom.dcmread(testdata("emri_small.dcm")).pixel_array
    assert v.shape == (10, 64, 64) and v.modality == "MR" and v.units == "intensity"
    np.testing.assert_array_equal(v.array, ref.astype(np.float32))
    # This file carries no plane position/orientation; the fallback is stated, not hidden.
    assert v.spacing_mm == pytest.approx((1.2, 1.0, 1.0))
    assert any("no plane position/orientation" in w for w in v.warnings)


@pytest.mark.parametrize("variant", ["emri_small_RLE.dcm", "emri_small_big_endian.dcm"])
def test_enhanced_mr_encodings_decode_identically(testdata, variant):
    base = load_study(testdata("emri_small.dcm"))
    np.testing.assert_array_equal(load_study(testdata(variant)).array, base.array)


def test_enhanced_ct_per_frame_groups(testdata):
    path = testdata("eCT_Supplemental.dcm")
    v = load_study(path)
    ds = pydicom.dcmread(path)
    assert v.shape == (2, 512, 512) and v.units == "HU"
    assert v.spacing_mm == pytest.approx((10.0, 0.388672, 0.388672))
    # IOP row (-1, 0, 0), column (0, 1, 0): normal = (0, 0, -1), so ascending order runs to z = -159.
    np.testing.assert_allclose(v.direction, [[-1, 0, 0], [0, 1, 0], [0, 0, -1]])
    positions = [f.PlanePositionSequence[0].ImagePositionPatient[2] for f in ds.PerFrameFunctionalGroupsSequence]
    first = int(np.argmax(positions))
    assert v.origin_mm[2] == pytest.approx(float(positions[first]))
    np.testing.assert_array_equal(v.array[0], ds.pixel_array[first].astype(np.float32) - 1024.0)


def test_dicomdir_folder_picks_the_axial_ct_and_skips_scouts(testdata):
    root = dicomdir_tests(testdata) / "98892001"
    infos = list_series(root)
    scout = next(i for i in infos if i.description == "Scout")
    assert scout.note == "localizer only" and scout.skipped == 2
    v = load_study(root)
    assert v.shape == (5, 16, 16) and v.spacing_mm[0] == pytest.approx(2.5)
    files = sorted((root / "CT5N").iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for z, f in enumerate(files):
        ds = pydicom.dcmread(f)
        np.testing.assert_array_equal(v.array[z], ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))


def test_dicomdir_ct_with_missing_slices(testdata):
    with pytest.raises(EdgeVLMError, match="uneven slice spacing"):
        load_study(dicomdir_tests(testdata) / "77654033" / "CT2")


def test_dicomdir_mr_projections_are_mixed_orientations(testdata):
    with pytest.raises(EdgeVLMError, match="mixed orientations"):
        load_study(dicomdir_tests(testdata) / "98892003" / "MR700")


def test_dicomdir_mr_localizers_form_no_volume(testdata):
    with pytest.raises(EdgeVLMError, match="no series here forms a 3D volume"):
        load_study(dicomdir_tests(testdata) / "98892003" / "MR1")


def _series_from_one_file(src: str, folder: Path, n: int = 3) -> Path:
    """Copies of one classic image at n positions, keeping its transfer syntax (pixels untouched)."""
    folder.mkdir()
    for k in range(n):
        ds = pydicom.dcmread(src)
        ds.ImagePositionPatient = [0.0, 0.0, 4.0 * k]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / f"im{k}.dcm")
    return folder


@pytest.mark.parametrize("variant", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm"])
def test_classic_series_encodings(testdata, tmp_path, variant):
    base = load_study(_series_from_one_file(testdata("MR_small.dcm"), tmp_path / "base"))
    other = load_study(_series_from_one_file(testdata(variant), tmp_path / "other"))
    assert base.shape == (3, 64, 64)
    assert pydicom.dcmread(next((tmp_path / "other").iterdir())).file_meta.TransferSyntaxUID == \
        pydicom.dcmread(testdata(variant)).file_meta.TransferSyntaxUID
    np.testing.assert_array_equal(other.array, base.array)


def test_copied_multiframe_file_in_a_folder(testdata, tmp_path):
    shutil.copy(testdata("eCT_Supplemental.dcm"), tmp_path / "ect.dcm")
    (info,) = list_series(tmp_path)
    assert info.multiframe and info.slices == 2
    assert load_study(tmp_path).shape == (2, 512, 512)
