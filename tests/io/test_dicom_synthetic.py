"""Geometry, pixel values and series choice on DICOM series written by the tests."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from edgevlm.errors import EdgeVLMError
from edgevlm.io import dicom as dicom_io
from edgevlm.io import list_series, load_study


def expected(k: int, rows: int = 8, cols: int = 6, slope: float = 1.0, intercept: float = -1024.0):
    r, c = np.mgrid[0:rows, 0:cols]
    return (100 * k + 10 * r + c) * slope + intercept


def test_ascending_series_geometry(tmp_path, make_series):
    make_series(tmp_path, n=6, z0=-50.0, dz=2.5)
    v = load_study(tmp_path)
    assert v.shape == (6, 8, 6) and v.array.dtype == np.float32
    assert v.spacing_mm == pytest.approx((2.5, 0.7, 0.7))
    assert v.origin_mm == pytest.approx((-30.0, -20.0, -50.0))
    np.testing.assert_allclose(v.direction, np.eye(3))
    for k in range(6):
        np.testing.assert_array_equal(v.array[k], expected(k))
    assert v.units == "HU" and v.modality == "CT" and v.warnings == []


def test_shuffled_file_names_and_instance_numbers(tmp_path, make_series):
    n = 7
    names = [f"IMG{i:04d}" for i in random.Random(3).sample(range(100), n)]  # no .dcm suffix, random order
    instances = random.Random(4).sample(range(1, 50), n)  # InstanceNumber says nothing about position
    make_series(tmp_path, n=n, names=names, instances=instances)
    v = load_study(tmp_path)
    for k in range(n):
        np.testing.assert_array_equal(v.array[k], expected(k))


def test_reversed_slice_order_gives_same_volume(tmp_path, make_series):
    # Positions written top-down (instance 1 is the most superior slice): the volume is still ordered
    # along the normal, inferior to superior.
    positions = [(-30.0, -20.0, 10.0 - 2.5 * k) for k in range(5)]
    make_series(tmp_path, positions=positions)
    v = load_study(tmp_path)
    assert v.origin_mm[2] == pytest.approx(0.0)
    for z in range(5):
        np.testing.assert_array_equal(v.array[z], expected(4 - z))


def test_missing_slice_is_an_error(tmp_path, make_series):
    positions = [(0.0, 0.0, 2.5 * k) for k in (0, 1, 2, 4, 5, 6)]
    make_series(tmp_path, positions=positions)
    with pytest.raises(EdgeVLMError, match=r"uneven slice spacing.*missing slices"):
        load_study(tmp_path)


def test_small_spacing_jitter_is_a_warning(tmp_path, make_series):
    positions = [(0.0, 0.0, 2.5 * k + (0.1 if k == 2 else 0.0)) for k in range(6)]
    make_series(tmp_path, positions=positions)
    v = load_study(tmp_path)
    assert v.spacing_mm[0] == pytest.approx(2.5)
    assert any("slice spacing varies" in w for w in v.warnings)


def test_gantry_tilt_is_detected_and_reported(tmp_path, make_series):
    tilt = np.radians(15.0)
    # Axial slices; each next slice is shifted posteriorly as on a tilted gantry.
    positions = [(0.0, 2.5 * k * np.tan(tilt), 2.5 * k) for k in range(6)]
    make_series(tmp_path, positions=positions)
    v = load_study(tmp_path)
    assert v.spacing_mm[0] == pytest.approx(2.5)  # distance between planes, along the normal
    assert any("gantry tilt of 15.0 degrees" in w for w in v.warnings)


def test_mixed_folder_picks_ct_and_selects_by_id_or_uid(tmp_path, make_series):
    make_series(tmp_path / "a", n=5)
    mr_uid, _ = make_series(tmp_path / "b", n=9, modality="MR", description="T1 axial", intercept=0.0)
    infos = list_series(tmp_path)
    assert [i.modality for i in infos] == ["CT", "MR"]  # best first
    assert load_study(tmp_path).modality == "CT"
    mr_id = infos[1].series_id
    v = load_study(tmp_path, series=mr_id)
    assert v.modality == "MR" and v.shape[0] == 9 and v.units == "intensity"
    assert load_study(tmp_path, series=mr_uid).shape[0] == 9
    with pytest.raises(EdgeVLMError, match=r"no series 'nope'.*choose one of"):
        load_study(tmp_path, series="nope")


def test_equally_good_series_is_ambiguous(tmp_path, make_series):
    make_series(tmp_path / "soft", n=5, description="soft kernel")
    make_series(tmp_path / "lung", n=5, description="lung kernel")
    with pytest.raises(EdgeVLMError, match="2 series are equally good candidates") as err:
        load_study(tmp_path)
    for info in list_series(tmp_path):
        assert info.series_id in str(err.value)
    assert "\n" not in str(err.value)


def test_more_slices_and_axial_win(tmp_path, make_series):
    make_series(tmp_path / "few", n=4, description="few")
    make_series(tmp_path / "many", n=8, description="many")
    make_series(tmp_path / "cor", n=12, description="coronal", orientation=(1, 0, 0, 0, 0, -1),
                positions=[(0.0, 2.0 * k, 0.0) for k in range(12)])
    assert load_study(tmp_path).series_description == "many"


def test_scouts_in_the_series_are_skipped(tmp_path, make_series, make_slice):
    uid, _ = make_series(tmp_path, n=6)
    make_slice(tmp_path / "scout1", series_uid=uid, position=(0, 0, 0), pixels=np.zeros((8, 6), np.int16),
               image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation=(0, 1, 0, 0, 0, -1))
    # A second scout without the LOCALIZER flag: found because its orientation differs from the majority.
    make_slice(tmp_path / "scout2", series_uid=uid, position=(0, 0, 0), pixels=np.zeros((8, 6), np.int16),
               orientation=(1, 0, 0, 0, 0, -1))
    v = load_study(tmp_path)
    assert v.shape == (6, 8, 6)
    assert any("skipped 2 localizer/scout" in w for w in v.warnings)
    assert list_series(tmp_path)[0].skipped == 2


def test_mixed_orientations_in_one_series_is_an_error(tmp_path, make_series):
    uid, _ = make_series(tmp_path, n=3)
    make_series(tmp_path, n=3, series_uid=uid, orientation=(1, 0, 0, 0, 0, -1),
                positions=[(0.0, 3.0 * k, 0.0) for k in range(3)], names=["c0", "c1", "c2"])
    with pytest.raises(EdgeVLMError, match="mixed orientations"):
        load_study(tmp_path)


def test_monochrome1_mr_is_inverted(tmp_path, make_series):
    make_series(tmp_path, n=3, modality="MR", photometric="MONOCHROME1", intercept=0.0, signed=False)
    v = load_study(tmp_path)
    # Unsigned 16-bit: stored value s becomes 65535 - s, so higher always means brighter.
    np.testing.assert_array_equal(v.array[1], 65535 - expected(1, intercept=0.0))
    assert any("MONOCHROME1" in w for w in v.warnings)


def test_monochrome1_ct_keeps_hounsfield_units(tmp_path, make_series):
    # MONOCHROME1 is a display rule applied after the modality LUT; HU come from the rescale alone.
    make_series(tmp_path, n=3, photometric="MONOCHROME1")
    v = load_study(tmp_path)
    np.testing.assert_array_equal(v.array[2], expected(2))


def test_unsigned_pixels_with_intercept(tmp_path, make_series):
    make_series(tmp_path, n=3, signed=False, intercept=-1024.0)
    v = load_study(tmp_path)
    np.testing.assert_array_equal(v.array[0], expected(0))
    assert v.array.min() == -1024.0


def test_signed_negative_stored_values(tmp_path, make_slice):
    uid = "1.2.826.0.1.3680043.8.498.77"
    for k in range(3):
        px = np.full((4, 4), -1000 + 500 * k, dtype=np.int16)
        make_slice(tmp_path / f"s{k}", series_uid=uid, position=(0, 0, k), pixels=px, intercept=0.0)
    v = load_study(tmp_path)
    assert v.array[:, 0, 0].tolist() == [-1000.0, -500.0, 0.0]


def test_per_slice_rescale(tmp_path, make_slice):
    uid = "1.2.826.0.1.3680043.8.498.78"
    for k, (slope, intercept) in enumerate([(1.0, -1024.0), (2.0, -2048.0), (0.5, -1000.0)]):
        make_slice(tmp_path / f"s{k}", series_uid=uid, position=(0, 0, k), slope=slope, intercept=intercept,
                   pixels=np.full((4, 4), 1000, dtype=np.int16))
    v = load_study(tmp_path)
    assert v.array[:, 0, 0].tolist() == [-24.0, -48.0, -500.0]


def test_single_file_loads_its_siblings(tmp_path, make_series):
    _, paths = make_series(tmp_path, n=5)
    make_series(tmp_path, n=3, names=["other0", "other1", "other2"])  # another series in the same folder
    v = load_study(paths[2])
    assert v.shape == (5, 8, 6)


def test_oblique_direction_and_normal_order(tmp_path, make_series):
    # Sagittal slices: x axis = posterior... rows run along +y (P), columns down -z; normal = +x or -x.
    orientation = (0, 1, 0, 0, 0, -1)
    positions = [(5.0 - 3.0 * k, 0.0, 0.0) for k in range(4)]
    make_series(tmp_path, positions=positions, orientation=orientation)
    v = load_study(tmp_path)
    normal = np.cross([0, 1, 0], [0, 0, -1])
    np.testing.assert_allclose(v.direction, [[0, 1, 0], [0, 0, -1], normal])
    along = [np.dot(p, normal) for p in positions]
    assert v.origin_mm == pytest.approx(positions[int(np.argmin(along))])
    assert v.spacing_mm[0] == pytest.approx(3.0)


def test_geometry_is_json_ready(tmp_path, make_series):
    make_series(tmp_path, n=3)
    json.dumps(load_study(tmp_path).geometry())


def test_list_series_reads_headers_only(tmp_path, make_series, monkeypatch):
    make_series(tmp_path, n=4)

    def no_pixels(*a, **k):
        raise AssertionError("list_series decoded pixel data")

    monkeypatch.setattr(dicom_io, "_decode", no_pixels)
    real = dicom_io.pydicom.dcmread

    def header_only(*args, **kwargs):
        assert kwargs.get("stop_before_pixels") is True
        return real(*args, **kwargs)

    monkeypatch.setattr(dicom_io.pydicom, "dcmread", header_only)
    (info,) = list_series(tmp_path)
    assert (info.modality, info.slices, info.rows, info.cols) == ("CT", 4, 8, 6)
    assert info.spacing_mm == pytest.approx((2.5, 0.7, 0.7))
    assert info.orientation == "axial" and info.note == ""
