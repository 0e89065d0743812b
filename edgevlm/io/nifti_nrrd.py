"""NIfTI (nibabel) and NRRD (pynrrd) volumes, optional extras.

Both formats store voxels with the fastest axis first (i, j, k) = (x, y, z) and an affine to world space;
NIfTI's world is RAS, NRRD says which in its `space` field. We convert to the Volume contract:
array axes (z, y, x) and LPS geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevlm.errors import EdgeVLMError
from edgevlm.volume import Volume

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
# Values below this are air in HU; a volume without a modality tag that reaches it is taken to be CT.
HU_AIR_HINT = -500.0


def _check_budget(shape: tuple[int, ...], max_voxels: int, path: Path) -> None:
    n = int(np.prod(shape, dtype=np.int64))
    if n > max_voxels:
        dims = " x ".join(str(d) for d in shape)
        raise EdgeVLMError(
            f"volume of {dims} = {n:,} voxels exceeds the memory budget of {max_voxels:,} voxels; "
            "pass a larger max_voxels or a smaller volume",
            path,
        )


def _squeeze_to_3d(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    if len(shape) < 3 or (len(shape) == 3 and 1 in shape[2:]):
        raise EdgeVLMError(
            f"image of shape {shape} is 2D, but the model needs a 3D volume; pass a 3D image", path
        )
    if len(shape) > 3 and int(np.prod(shape[3:])) != 1:
        raise EdgeVLMError(f"image of shape {shape} holds several volumes; extract one 3D volume", path)
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _from_ijk(data_ijk: np.ndarray, affine_lps: np.ndarray, path: Path, warnings: list[str]) -> Volume:
    """Build a Volume from an (i, j, k) array and a 4x4 voxel-to-LPS affine."""
    cols = affine_lps[:3, :3]
    spacing_ijk = np.linalg.norm(cols, axis=0)
    if np.any(spacing_ijk <= 0):
        raise EdgeVLMError("affine has a zero-length axis; the file's geometry is broken", path)
    direction = (cols / spacing_ijk).T  # rows: unit vectors of the i (x), j (y), k (z) axes
    if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
        warnings.append("affine has shear; the voxel axes are not orthogonal and shear is ignored")
    array = np.ascontiguousarray(data_ijk.transpose(2, 1, 0), dtype=np.float32)
    modality, units = "OT", "intensity"
    if array.size and float(array.min()) <= HU_AIR_HINT:
        modality, units = "CT", "HU"
        warnings.append(
            f"no modality in {path.suffix or 'the'} file: values reach {float(array.min()):.0f}, taken as CT in HU"
        )
    return Volume(
        array=array,
        spacing_mm=(float(spacing_ijk[2]), float(spacing_ijk[1]), float(spacing_ijk[0])),
        origin_mm=tuple(float(v) for v in affine_lps[:3, 3]),
        direction=direction,
        modality=modality,
        units=units,
        warnings=warnings,
    )


def load_nifti(path: Path, max_voxels: int) -> Volume:
    try:
        import nibabel as nib
    except ImportError:
        raise EdgeVLMError("reading NIfTI needs nibabel: pip install edgevlm[nifti]", path) from None
    try:
        img = nib.load(str(path))
        shape = tuple(int(d) for d in img.shape)
    except Exception as e:  # nibabel raises many types for damaged files
        raise EdgeVLMError(f"unreadable NIfTI file ({type(e).__name__}); re-export it", path) from None
    shape3 = _squeeze_to_3d(shape, path)
    _check_budget(shape3, max_voxels, path)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape3)  # applies scl_slope/inter
    except Exception as e:
        raise EdgeVLMError(f"cannot read NIfTI voxels ({type(e).__name__}): truncated or corrupt", path) from None
    affine_lps = img.affine.copy()
    affine_lps[:3, :] = RAS_TO_LPS @ affine_lps[:3, :]
    return _from_ijk(data, affine_lps, path, [])


_LPS_SIGNS = {
    "left-posterior-superior": (1, 1, 1),
    "lps": (1, 1, 1),
    "right-anterior-superior": (-1, -1, 1),
    "ras": (-1, -1, 1),
    "left-anterior-superior": (1, -1, 1),
    "las": (1, -1, 1),
}


def load_nrrd(path: Path, max_voxels: int) -> Volume:
    try:
        import nrrd
    except ImportError:
        raise EdgeVLMError("reading NRRD needs pynrrd: pip install edgevlm[nrrd]", path) from None
    try:
        header = nrrd.read_header(str(path))
    except Exception as e:
        raise EdgeVLMError(f"unreadable NRRD header ({type(e).__name__}); re-export it", path) from None
    shape3 = _squeeze_to_3d(tuple(int(d) for d in header.get("sizes", ())), path)
    _check_budget(shape3, max_voxels, path)
    try:
        data, header = nrrd.read(str(path))  # Fortran index order: data[i, j, k]
    except Exception as e:
        raise EdgeVLMError(f"cannot read NRRD voxels ({type(e).__name__}): truncated or corrupt", path) from None
    data = np.asarray(data).reshape(shape3)
    warnings: list[str] = []
    affine = np.eye(4)
    space = str(header.get("space", "")).lower()
    dirs = header.get("space directions")
    if space and dirs is not None:
        if space not in _LPS_SIGNS:
            raise EdgeVLMError(f"NRRD space '{space}' is not a patient space (LPS/RAS/LAS)", path)
        dirs = np.asarray([d for d in dirs if d is not None], dtype=np.float64)
        if dirs.shape != (3, 3):
            raise EdgeVLMError("NRRD 'space directions' is not 3 x 3; expected one vector per axis", path)
        affine[:3, :3] = dirs.T  # each row of 'space directions' is one voxel axis
        affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
        affine[:3, :] = np.diag(_LPS_SIGNS[space]) @ affine[:3, :]
    else:
        spacings = header.get("spacings")
        sp = np.asarray(spacings, dtype=np.float64)[:3] if spacings is not None else np.ones(3)
        affine[:3, :3] = np.diag(np.nan_to_num(sp, nan=1.0))
        warnings.append("NRRD has no patient space; assumed LPS axes with the file's spacings")
    return _from_ijk(data, affine, path, warnings)
