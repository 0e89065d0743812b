"""`edgevlm export` + `edgevlm infer` end to end: DICOM folder / file / NIfTI, --json, --profile,
offline with every socket refused, and bad input as one-line errors with exit status 2."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from edgevlm.export.testing import make_checkpoint, tiny_bundle, tiny_config
from typer.testing import CliRunner

from edgevlm.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def gqa_bundle(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_bundle(tmp_path_factory.getbasetemp() / "edgevlm-bundles", "gqa")


@pytest.fixture(scope="module")
def dicom_study(tmp_path_factory) -> Path:
    """A synthetic chest CT series on a coarse 12x40x40 grid (the full native grid is not needed)."""
    from edgevlm.data import sample_study
    from edgevlm.data.dicom import write_dicom_series

    spec = sample_study(0)
    small = dataclasses.replace(spec, n_slices=12, rows=40, cols=40,
                                slice_spacing_mm=spec.n_slices * spec.slice_spacing_mm / 12,
                                pixel_spacing_mm=spec.rows * spec.pixel_spacing_mm / 40)
    out = tmp_path_factory.mktemp("study") / "dicom"
    write_dicom_series(small, out)
    return out


def _one_error_line(result, progress: bool = False) -> str:
    """The single error line; `progress`: export's progress lines (stderr, before it) are allowed."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    if progress:
        lines = lines[-1:] if all("error" not in line for line in lines[:-1]) else lines
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_infer_dicom_folder_json_and_profile(gqa_bundle, dicom_study, tmp_path):
    _, bundle = gqa_bundle
    out = tmp_path / "result.json"
    result = runner.invoke(app, ["infer", str(dicom_study), "--bundle", str(bundle), "--prompt",
                                 "Is there a pleural effusion?", "--json", str(out), "--profile",
                                 "--threads", "1", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    for stage in ("load", "read study", "preprocess", "vision", "prefill", "decode", "tokens/s", "total",
                  "peak RSS"):
        assert stage in result.output
    record = json.loads(out.read_text())
    assert record["prompt"] == "Is there a pleural effusion?" and record["text"] in result.output
    assert record["bundle_id"] == __import__("edgevlm.checkpoint").checkpoint.file_sha256(bundle / "manifest.json")
    assert record["study"]["shape_zyx"] == [12, 40, 40] and record["study"]["modality"] == "CT"
    assert str(dicom_study) not in out.read_text()  # no study path (folder names can carry names)
    assert record["memory"]["peak_rss_bytes"] > 0 and 1 <= record["n_new_tokens"] <= 6
    assert set(record["timings_ms"]) >= {"load", "read_study", "preprocess", "vision", "prefill", "decode", "total"}


def test_infer_single_dicom_file_nifti_and_torch_backend_agree(gqa_bundle, dicom_study, tmp_path):
    nib = pytest.importorskip("nibabel")
    from edgevlm.io import load_study

    _, bundle = gqa_bundle
    volume = load_study(dicom_study)
    # NIfTI stores RAS; flip x and y of the LPS voxel grid into the affine so the geometry is the same.
    zyx = np.asarray(volume.array)
    affine = np.diag([-volume.spacing_mm[2], -volume.spacing_mm[1], volume.spacing_mm[0], 1.0])
    nii = tmp_path / "study.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(zyx, (2, 1, 0)).astype(np.int16), affine), str(nii))
    texts = {}
    for name, study, backend in [("folder", dicom_study, "ort"), ("file", sorted(dicom_study.iterdir())[0], "ort"),
                                 ("torch", dicom_study, "torch"), ("nifti", nii, "ort")]:
        out = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["infer", str(study), "--bundle", str(bundle), "--backend", backend,
                                     "--json", str(out), "--max-new-tokens", "5"])
        assert result.exit_code == 0, result.output
        texts[name] = json.loads(out.read_text())["token_ids"]
    assert texts["folder"] == texts["file"] == texts["torch"]
    assert len(texts["nifti"]) >= 1


def test_export_and_infer_fully_offline(tmp_path, monkeypatch, dicom_study):
    """Every socket refused, loopback included, and no name lookups: export (fp16, through the CLI) and
    infer still work. (tests/conftest.py already refuses non-loopback connections for every test.)"""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    ckpt = make_checkpoint(tmp_path / "m.safetensors", tiny_config("gqa"))
    bundle = tmp_path / "bundle-fp16"
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(bundle), "--precision", "fp16",
                                 "--parity-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "parity vs PyTorch fp32" in result.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["parity"]["passed"]
    assert manifest["parity"]["thresholds"]["vision_cosine_min"] == 0.999
    result = runner.invoke(app, ["infer", str(dicom_study), "--bundle", str(bundle), "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("damage", ["newer-edgevlm", "missing-file", "corrupt-onnx", "tampered", "non-dicom",
                                    "no-bundle"])
def test_bad_input_is_one_line_and_exit_2(gqa_bundle, dicom_study, tmp_path, damage):
    _, good = gqa_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(good, bundle)
    study = dicom_study
    expected = {"newer-edgevlm": "written by edgevlm 99.1.0", "missing-file": "embeddings.safetensors is missing",
                "corrupt-onnx": "vision.onnx", "tampered": "does not match its sha256",
                "non-dicom": "not a DICOM file", "no-bundle": "no such bundle folder"}[damage]
    if damage == "newer-edgevlm":
        m = json.loads((bundle / "manifest.json").read_text())
        m["edgevlm_version"] = "99.1.0"
        (bundle / "manifest.json").write_text(json.dumps(m))
    elif damage == "missing-file":
        (bundle / "embeddings.safetensors").unlink()
    elif damage == "corrupt-onnx":
        data = bytearray((bundle / "vision.onnx").read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
        (bundle / "vision.onnx").write_bytes(bytes(data))
    elif damage == "tampered":
        (bundle / "preprocess.json").write_text((bundle / "preprocess.json").read_text().replace("1000", "1001"))
    elif damage == "non-dicom":
        study = tmp_path / "report.pdf"
        study.write_bytes(b"%PDF-1.4 not a study")
    elif damage == "no-bundle":
        bundle = tmp_path / "nowhere"
    result = runner.invoke(app, ["infer", str(study), "--bundle", str(bundle)])
    assert expected in _one_error_line(result)


def test_export_cli_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "b")])
    assert "no such file" in _one_error_line(result, progress=True)
    ckpt = make_checkpoint(tmp_path / "m.safetensors", tiny_config("gqa"))
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "b"), "--precision", "int3"])
    assert "--precision" in _one_error_line(result, progress=True)
    assert not (tmp_path / "b").exists()


def test_infer_warns_when_tensorrt_would_not_take_the_graphs(gqa_bundle, dicom_study, monkeypatch):
    import edgevlm.runtime as runtime

    real = runtime.load_bundle

    def with_tensorrt(*args, **kwargs):  # mock: this onnxruntime has no TensorRT provider to register
        session = real(*args, **kwargs)
        session.backend.providers = ["TensorrtExecutionProvider", "CPUExecutionProvider"]
        return session

    monkeypatch.setattr(runtime, "load_bundle", with_tensorrt)
    _, bundle = gqa_bundle
    result = runner.invoke(app, ["infer", str(dicom_study), "--bundle", str(bundle), "--max-new-tokens", "2",
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "TensorRT will not take these nodes" in result.output and "MultiHeadAttention x2" in result.output
    monkeypatch.setattr(runtime, "load_bundle", real)  # the CPU provider alone: no such warning
    result = runner.invoke(app, ["infer", str(dicom_study), "--bundle", str(bundle), "--max-new-tokens", "2",
                                 "--threads", "1"])
    assert result.exit_code == 0 and "TensorRT" not in result.output, result.output
