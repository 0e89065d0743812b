"""NIfTI and NRRD: axes to (z, y, x), RAS to LPS, and a clear error when the extra is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from edgevlm.errors import EdgeVLMError
from edgevlm.io import load_study

nib = pytest.importorskip("nibabel")
nrrd = pytest.importorskip("nrrd")


def ijk_ramp(shape=(5, 4, 3)) -> np.ndarray:
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (i + 10 * j + 100 * k - 1000).astype(np.int16)


def test_nifti_ras_to_lps_and_axes(tmp_path):
    affine = np.diag([0.8, 0.9, 2.0, 1.0])
    affine[:3, 3] = (10.0, 20.0, 30.0)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ijk_ramp(), affine), path)
    v = load_study(path)
    assert v.shape == (3, 4, 5)
    assert v.array[2, 1, 4] == 4 + 10 * 1 + 100 * 2 - 1000  # array[z, y, x] = data[x, y, z]
    assert v.spacing_mm == pytest.approx((2.0, 0.9, 0.8))
    np.testing.assert_allclose(v.direction, np.diag([-1.0, -1.0, 1.0]))  # +i is Right = -L in LPS
    assert v.origin_mm == pytest.approx((-10.0, -20.0, 30.0))
    assert v.modality == "CT" and v.units == "HU"  # values reach -1000


def test_nifti_and_dicom_style_volume_preprocess_the_same(tmp_path):
    from edgevlm.preprocess import RECIPES, preprocess
    from edgevlm.volume import Volume

    data = np.random.default_rng(0).normal(-300, 300, size=(40, 30, 12)).astype(np.float32)
    path = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.5, 1.0])), path)  # RAS: x to the Right
    from_nifti = load_study(path)
    # The same anatomy stored the DICOM way: x runs to the Left, so the x axis is reversed.
    lps = Volume(np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1]), (2.5, 1.0, 1.0))
    recipe = RECIPES["demo-chest"]
    np.testing.assert_array_equal(preprocess(from_nifti, recipe), preprocess(lps, recipe))


def test_nifti_2d_is_an_error(tmp_path):
    path = tmp_path / "slice.nii"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 1), np.float32), np.eye(4)), path)
    with pytest.raises(EdgeVLMError, match="2D"):
        load_study(path)


def test_nifti_budget(tmp_path):
    path = tmp_path / "big.nii"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), path)
    with pytest.raises(EdgeVLMError, match="memory budget"):
        load_study(path, max_voxels=100)


def test_missing_nibabel_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ijk_ramp(), np.eye(4)), path)
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel now raises ImportError
    with pytest.raises(EdgeVLMError, match=r"pip install edgevlm\[nifti\]"):
        load_study(path)


def test_missing_pynrrd_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "v.nrrd"
    nrrd.write(str(path), ijk_ramp())
    monkeypatch.setitem(sys.modules, "nrrd", None)
    with pytest.raises(EdgeVLMError, match=r"pip install edgevlm\[nrrd\]"):
        load_study(path)


def test_nrrd_lps_space(tmp_path):
    path = tmp_path / "v.nrrd"
    header = {
        "space": "left-posterior-superior",
        "space directions": np.diag([0.5, 0.6, 3.0]),
        "space origin": np.array([1.0, 2.0, 3.0]),
    }
    nrrd.write(str(path), ijk_ramp(), header)
    v = load_study(path)
    assert v.shape == (3, 4, 5) and v.array[1, 2, 3] == 3 + 20 + 100 - 1000
    assert v.spacing_mm == pytest.approx((3.0, 0.6, 0.5))
    np.testing.assert_allclose(v.direction, np.eye(3))
    assert v.origin_mm == pytest.approx((1.0, 2.0, 3.0))


def test_nrrd_ras_space(tmp_path):
    path = tmp_path / "v.nrrd"
    header = {"space": "right-anterior-superior", "space directions": np.eye(3), "space origin": np.zeros(3)}
    nrrd.write(str(path), ijk_ramp(), header)
    np.testing.assert_allclose(load_study(path).direction, np.diag([-1.0, -1.0, 1.0]))
