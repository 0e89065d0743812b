"""Study ingestion: DICOM (folders, series, multi-frame), NIfTI and NRRD into a `Volume`.

    volume = load_study("study/")            # best axial CT/MR series in the folder
    for info in list_series("study/"): ...   # headers only, no identifiers

No patient identifier is ever read into a Volume, a listing or an error message.
"""

from __future__ import annotations

from pathlib import Path

from edgevlm.errors import EdgeVLMError
from edgevlm.io.dicom import DEFAULT_MAX_VOXELS, SeriesInfo, list_series, load_dicom
from edgevlm.volume import Volume

__all__ = ["DEFAULT_MAX_VOXELS", "SeriesInfo", "list_series", "load_study"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_NRRD_SUFFIXES = (".nrrd", ".nhdr")


def load_study(path: str | Path, series: str | None = None, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Load one study into a `Volume` (float32 (D, H, W); HU for CT; LPS geometry).

    `path` may be:
    - a folder of DICOM files (searched recursively), one or several series grouped by
      SeriesInstanceUID. `series` picks one by the short id `list_series` shows or by the full UID.
      Without it the rule is: among series that form a 3D volume, prefer CT over MR over other
      modalities, then axial slices, then the most slices, then the thinnest slice spacing; an exact tie
      (e.g. two reconstruction kernels of one scan) raises an error listing the candidates;
    - one multi-frame DICOM file (Enhanced CT/MR: geometry and rescale per frame);
    - one file of a classic series: the other files of that series in the same folder are used;
    - a NIfTI (.nii, .nii.gz; needs the `nifti` extra) or NRRD (.nrrd, .nhdr; `nrrd` extra) volume.

    Slices are ordered along the slice normal, rescaled per slice, and checked: uneven spacing beyond
    20 % of the median (missing slices) and mixed orientations are errors; spacing jitter, gantry tilt and
    skipped localizers are noted in `Volume.warnings`. Volumes over `max_voxels` are refused from their
    headers before any pixel is decoded. Every user-caused failure raises `EdgeVLMError` (one line).
    """
    path = Path(path)
    if not path.exists():
        raise EdgeVLMError("no such file or folder; check the path", path)
    name = path.name.lower()
    if path.is_file() and name.endswith(_NIFTI_SUFFIXES):
        from edgevlm.io.nifti_nrrd import load_nifti

        return load_nifti(path, max_voxels)
    if path.is_file() and name.endswith(_NRRD_SUFFIXES):
        from edgevlm.io.nifti_nrrd import load_nrrd

        return load_nrrd(path, max_voxels)
    return load_dicom(path, series, max_voxels)
