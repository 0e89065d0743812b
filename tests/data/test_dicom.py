from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from edgevlm.data import render_volume, sample_study
from edgevlm.data.dicom import make_synthetic, patient_tags, study_uids, write_dicom_series
from edgevlm.errors import EdgeVLMError


def _short_spec(seed: int = 4, n_slices: int = 6):
    # Full 512x512 slices, but only a few of them: the round trip is per slice anyway.
    spec = sample_study(seed)
    spec.n_slices = n_slices
    return spec


def _read_hu(paths):
    dss = [pydicom.dcmread(p) for p in paths]
    hu = np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    return dss, hu


def test_series_round_trip_matches_render(tmp_path):
    spec = _short_spec()
    paths = write_dicom_series(spec, tmp_path / "dicom")
    assert len(paths) == spec.n_slices
    dss, hu = _read_hu(paths)
    ref = render_volume(spec, spec.native_shape_zyx, spec.native_spacing_mm, spec.native_origin_mm())
    assert np.abs(hu - ref).max() <= 1.0
    d0, d1 = dss[0], dss[1]
    assert d0.SOPClassUID == pydicom.uid.CTImageStorage
    assert d0.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (d0.Rows, d0.Columns) == (512, 512)
    assert d0.pixel_array.dtype == np.int16
    assert [float(v) for v in d0.PixelSpacing] == pytest.approx([spec.pixel_spacing_mm] * 2)
    assert 0.6 <= float(d0.PixelSpacing[0]) <= 0.8
    assert float(d1.ImagePositionPatient[2]) - float(d0.ImagePositionPatient[2]) == pytest.approx(spec.slice_spacing_mm)
    assert [float(v) for v in d0.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in d0.ImagePositionPatient] == pytest.approx(list(spec.native_origin_mm()), abs=1e-3)
    # One study, one series, unique instances.
    assert len({d.StudyInstanceUID for d in dss}) == 1 and len({d.SeriesInstanceUID for d in dss}) == 1
    assert len({d.SOPInstanceUID for d in dss}) == len(dss)
    assert str(d0.PatientName) == "SYNTHETIC^00004"


def test_series_is_deterministic(tmp_path):
    spec = _short_spec(n_slices=2)
    a = write_dicom_series(spec, tmp_path / "a")
    b = write_dicom_series(spec, tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert study_uids(spec) != study_uids(_short_spec(seed=5))


def test_existing_folder_is_refused(tmp_path):
    (tmp_path / "dicom").mkdir()
    with pytest.raises(EdgeVLMError, match="exists"):
        write_dicom_series(_short_spec(n_slices=1), tmp_path / "dicom")


def test_round_trip_through_loader(tmp_path):
    io = pytest.importorskip("edgevlm.io")
    if not hasattr(io, "load_study"):
        pytest.skip("edgevlm.io.load_study not available")
    spec = _short_spec()
    write_dicom_series(spec, tmp_path / "dicom")
    vol = io.load_study(tmp_path / "dicom")
    ref = render_volume(spec, spec.native_shape_zyx, spec.native_spacing_mm, spec.native_origin_mm())
    assert vol.shape == ref.shape
    assert np.abs(vol.array - ref).max() <= 1.0
    assert vol.spacing_mm == pytest.approx(spec.native_spacing_mm)
    assert vol.origin_mm == pytest.approx(spec.native_origin_mm(), abs=1e-3)


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    import edgevlm.data.spec as spec_mod

    real = spec_mod.sample_study

    def short(seed, config=None):  # keep the set small: a few slices per study
        s = real(seed, config)
        s.n_slices = 3
        return s

    import edgevlm.data.dicom as dicom_mod

    dicom_mod.sample_study, saved = short, dicom_mod.sample_study
    try:
        entries = make_synthetic(out, 3, seed=7)
    finally:
        dicom_mod.sample_study = saved
    return out, entries


def test_make_synthetic_layout(synthetic_set):
    out, entries = synthetic_set
    index = json.loads((out / "studies.json").read_text())
    assert [e["study_id"] for e in index["studies"]] == ["SYN00007", "SYN00008", "SYN00009"]
    assert [e["study_id"] for e in entries] == ["SYN00007", "SYN00008", "SYN00009"]
    for e in entries:
        d = out / e["path"]
        assert len(list((d / "dicom").glob("*.dcm"))) == 3
        truth = json.loads((d / "ground_truth.json").read_text())
        assert truth["seed"] == e["seed"]
        assert truth["report"].startswith("IMPRESSION:") and "FINDINGS:" in truth["report"]
        assert truth["questions"] and all(q["kind"] in ("closed", "open") for q in truth["questions"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_no_patient_tags_in_json(synthetic_set):
    out, entries = synthetic_set
    texts = [(out / "studies.json").read_text()] + [
        (out / e["path"] / "ground_truth.json").read_text() for e in entries
    ]
    for e in entries:
        spec = sample_study(e["seed"])
        ds = pydicom.dcmread(next((out / e["path"] / "dicom").glob("*.dcm")))
        identifying = {**patient_tags(spec), **study_uids(spec), "SOPInstanceUID": str(ds.SOPInstanceUID)}
        assert str(ds.PatientName) == identifying["PatientName"]
        assert ds.PatientID == identifying["PatientID"]
        for text in texts:
            for name, value in identifying.items():
                assert value not in text, f"{name} leaked into JSON"
            assert "SYNTHETIC^" not in text
