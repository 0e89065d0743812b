"""Synthetic DICOM series written with pydicom, and offline access to pydicom's test files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

# Planted in every synthetic file; none of these strings may ever leave the loader.
PHI = {
    "PatientName": "Doe^Jane^Quincy",
    "PatientID": "PID-424242",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ACC-777123",
    "InstitutionName": "St Elsewhere Hospital",
    "ReferringPhysicianName": "House^Gregory",
}


def slice_pixels(k: int, rows: int, cols: int) -> np.ndarray:
    """Stored values of slice k: 100*k plus a row/column ramp, so order and in-plane layout are checkable."""
    r, c = np.mgrid[0:rows, 0:cols]
    return (100 * k + 10 * r + c).astype(np.int16)


def write_slice(
    path: Path,
    *,
    series_uid: str,
    position: Sequence[float],
    pixels: np.ndarray,
    instance: int = 1,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    spacing: Sequence[float] = (0.7, 0.7),
    slope: float = 1.0,
    intercept: float = -1024.0,
    signed: bool = True,
    photometric: str = "MONOCHROME2",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    modality: str = "CT",
    description: str = "Chest 1.0 B31f",
    with_pixels: bool = True,
) -> Path:
    meta = FileMetaDataset()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = 1.0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    if with_pixels:
        ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    folder: Path,
    n: int = 6,
    *,
    z0: float = -50.0,
    dz: float = 2.5,
    rows: int = 8,
    cols: int = 6,
    positions: Sequence[Sequence[float]] | None = None,
    series_uid: str | None = None,
    names: Sequence[str] | None = None,
    instances: Sequence[int] | None = None,
    **kwargs,
) -> tuple[str, list[Path]]:
    """Write one series; slice k (in `positions` order) holds slice_pixels(k). Returns (uid, paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    positions = positions or [(-30.0, -20.0, z0 + k * dz) for k in range(n)]
    paths = []
    for k, pos in enumerate(positions):
        name = names[k] if names else f"{uid[-6:]}_{k:03d}.dcm"
        inst = instances[k] if instances else k + 1
        paths.append(
            write_slice(folder / name, series_uid=uid, position=pos, pixels=slice_pixels(k, rows, cols),
                        instance=inst, **kwargs)
        )
    return uid, paths


@pytest.fixture
def make_series() -> Callable[..., tuple[str, list[Path]]]:
    return write_series


@pytest.fixture
def make_slice() -> Callable[..., Path]:
    return write_slice


@pytest.fixture
def testdata() -> Callable[[str], str]:
    """Path of a pydicom / pydicom-data test file, found locally only (download=False: never the network)."""
    from pydicom.data import get_testdata_file

    def get(name: str) -> str:
        path = get_testdata_file(name, download=False)
        if path is None:
            pytest.skip(f"{name} is not installed locally (pydicom-data)")
        return str(path)

    return get
