"""Write synthetic studies as real CT Image Storage DICOM series, plus their ground truth.

Everything is deterministic for a seed, UIDs included (`generate_uid(entropy_srcs=...)`), so a
regenerated set is byte-identical. Patient tags are obviously fake
("SYNTHETIC^00007") and are never copied into the JSON files written beside the images.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from edgevlm.data.phantom import render_volume
from edgevlm.data.reports import ground_truth
from edgevlm.data.spec import StudySpec, SyntheticConfig, sample_study
from edgevlm.errors import EdgeVLMError

RESCALE_INTERCEPT = -1024.0  # stored = HU + 1024, so air is 0 and the int16 range is never hit
_FAKE_DATE = "20000101"


def patient_tags(spec: StudySpec) -> dict[str, str]:
    """The (fake) identifying tags written into a study's DICOM; kept out of every JSON file."""
    return {
        "PatientName": f"SYNTHETIC^{spec.seed:05d}",
        "PatientID": f"SYNTHPAT{spec.seed:05d}",
        "PatientBirthDate": "19000101",
        "AccessionNumber": f"SYNACC{spec.seed:05d}",
    }


def study_uids(spec: StudySpec) -> dict[str, str]:
    base = ["edgevlm-synthetic", str(spec.seed)]
    return {
        "StudyInstanceUID": str(generate_uid(entropy_srcs=[*base, "study"])),
        "SeriesInstanceUID": str(generate_uid(entropy_srcs=[*base, "series"])),
        "FrameOfReferenceUID": str(generate_uid(entropy_srcs=[*base, "frame"])),
    }


def _series_template(spec: StudySpec, uids: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer = "edgevlm synthetic phantom"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _FAKE_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyDescription = "CT CHEST (SYNTHETIC)"
    ds.SeriesDescription = "SYNTHETIC AXIAL CHEST"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    for k, v in patient_tags(spec).items():
        setattr(ds, k, v)
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"  # nothing real was ever here
    for k, v in uids.items():
        setattr(ds, k, v)
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.KVP = 120
    ds.SliceThickness = spec.slice_spacing_mm
    ds.SpacingBetweenSlices = spec.slice_spacing_mm
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [spec.pixel_spacing_mm, spec.pixel_spacing_mm]  # row spacing (y), column spacing (x)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1  # signed int16
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1.0
    ds.RescaleType = "HU"
    ds.WindowCenter = [-600, 40]
    ds.WindowWidth = [1500, 400]
    return ds


def write_dicom_series(
    spec: StudySpec,
    out_dir: str | Path,
    hu: np.ndarray | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the study's native series (one CT Image Storage file per slice) into `out_dir`.

    `hu` is the rendered native volume if the caller already has it (else it is rendered here).
    The folder appears whole or not at all: files go to a temporary sibling that is renamed.
    Returns the written paths in slice order (inferior to superior).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise EdgeVLMError("output folder exists; use overwrite=True or another folder", out_dir)
    shape, spacing, origin = spec.native_shape_zyx, spec.native_spacing_mm, spec.native_origin_mm()
    if hu is None:
        hu = render_volume(spec, shape, spacing, origin)
    if hu.shape != shape:
        raise ValueError(f"hu has shape {hu.shape}, the study's native grid is {shape}")
    stored = np.rint(np.clip(hu, -1024.0, 3071.0) - RESCALE_INTERCEPT).astype("<i2")

    uids = study_uids(spec)
    template = _series_template(spec, uids)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    names = []
    try:
        for k in range(shape[0]):
            ds = Dataset()
            ds.update(template)
            sop_uid = generate_uid(entropy_srcs=["edgevlm-synthetic", str(spec.seed), "sop", str(k)])
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = k + 1
            z_mm = origin[2] + k * spacing[0]
            ds.ImagePositionPatient = [round(origin[0], 4), round(origin[1], 4), round(z_mm, 4)]
            ds.SliceLocation = round(z_mm, 4)
            ds.PixelData = stored[k].tobytes()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            name = f"CT{k + 1:04d}.dcm"
            dcmwrite(tmp / name, ds, enforce_file_format=True)
            names.append(name)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / n for n in names]


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src onto dst; an existing dst is moved aside first and removed after."""
    trash = None
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, trash)
    os.replace(src, dst)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _write_json_atomic(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def write_study(spec: StudySpec, study_dir: str | Path, overwrite: bool = False) -> dict:
    """One study folder: `dicom/*.dcm` and `ground_truth.json`, written atomically. Returns its index entry."""
    study_dir = Path(study_dir)
    if study_dir.exists() and not overwrite:
        raise EdgeVLMError("study folder exists; use --overwrite (overwrite=True) or another output folder", study_dir)
    study_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{study_dir.name}.", dir=study_dir.parent))
    try:
        write_dicom_series(spec, tmp / "dicom")
        truth = ground_truth(spec)
        _write_json_atomic(tmp / "ground_truth.json", truth)
        _replace_dir(tmp, study_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "study_id": spec.study_id,
        "seed": spec.seed,
        "path": study_dir.name,
        "normal": spec.is_normal,
        "finding_types": sorted({f["type"] for f in truth["findings"]}),
        "n_slices": spec.n_slices,
        "spacing_mm_zyx": list(spec.native_spacing_mm),
    }


def make_synthetic(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    config: SyntheticConfig | None = None,
    overwrite: bool = False,
    on_study: Callable[[int, str], None] | None = None,
) -> list[dict]:
    """Write `n` studies (seeds seed .. seed+n-1) under `out_dir` and the index `out_dir/studies.json`.

    Studies already listed in an existing index are kept (the index is merged); a study folder that
    exists is an error unless `overwrite`. `on_study(i, study_id)` is called after each study.
    """
    if n < 0:
        raise EdgeVLMError(f"--n must be >= 0, got {n}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / "studies.json"
    entries: dict[str, dict] = {}
    if index_path.exists():
        try:
            entries = {e["study_id"]: e for e in json.loads(index_path.read_text())["studies"]}
        except (ValueError, KeyError, TypeError) as e:
            raise EdgeVLMError(f"unreadable study index ({e}); delete it or choose another folder", index_path) from e
    written = []
    for i in range(n):
        spec = sample_study(seed + i, config)
        entry = write_study(spec, out_dir / spec.study_id, overwrite=overwrite)
        entries[spec.study_id] = entry
        written.append(entry)
        # Keep the index current after every study, so an interrupted run leaves a usable set.
        _write_json_atomic(
            index_path, {"format": "edgevlm-synthetic-v1", "studies": sorted(entries.values(), key=lambda e: e["seed"])}
        )
        if on_study is not None:
            on_study(i, spec.study_id)
    if n == 0:
        _write_json_atomic(
            index_path, {"format": "edgevlm-synthetic-v1", "studies": sorted(entries.values(), key=lambda e: e["seed"])}
        )
    return written
