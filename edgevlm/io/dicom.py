"""DICOM ingestion: scan headers, group images by series, pick one, stack it into a `Volume`.

Only the tags named in this module are read (geometry, pixel format, modality, series description);
patient and institution tags are never accessed, so they cannot reach a Volume, a listing or an error.
Errors name files by path. pydicom's own warnings are silenced while reading because they can quote
element values.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from edgevlm.errors import EdgeVLMError
from edgevlm.io.geometry import orientation_label, stack_slices, unit_axes
from edgevlm.volume import Volume

# 2 GiB of float32: a 512 x 512 x 2048 CT. Checked from the headers before any pixel is decoded.
DEFAULT_MAX_VOXELS = 512 * 512 * 2048
SERIES_ID_CHARS = 10
JPEG_EXTRA = "pip install edgevlm[jpeg]"
# Reading a header can fail in many ways on a damaged file; all of them mean "this file is unreadable".
_READ_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError)


@dataclass(frozen=True)
class SeriesInfo:
    """One series in a folder, as `edgevlm studies ls` shows it. Holds no identifiers."""

    series_id: str  # short hash of the SeriesInstanceUID; `load_study(series=...)` accepts it
    modality: str
    description: str
    slices: int  # images that form the volume (localizers and scouts excluded)
    rows: int
    cols: int
    spacing_mm: tuple[float | None, float | None, float | None]  # (z, y, x); z None for one slice
    orientation: str  # axial / coronal / sagittal / oblique / mixed / unknown
    files: int
    multiframe: bool
    skipped: int  # localizer and scout images left out
    note: str = ""  # why this series cannot be loaded as a 3D volume, "" when it can

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Image:
    """One 2D image: a single-frame file or one frame of a multi-frame file."""

    path: str
    frame: int | None
    position: np.ndarray | None  # ImagePositionPatient, LPS mm
    orientation: np.ndarray | None  # ImageOrientationPatient (6,)
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) mm
    slope: float
    intercept: float
    localizer: bool


@dataclass
class _Series:
    uid: str
    modality: str
    description: str
    rows: int
    cols: int
    multiframe: bool
    files: list[str] = field(default_factory=list)
    images: list[_Image] = field(default_factory=list)
    spacing_between_slices: float | None = None  # fallback for multi-frame files without geometry

    @property
    def series_id(self) -> str:
        return short_id(self.uid)


def short_id(series_uid: str) -> str:
    """A short, stable, non-identifying handle for a series (hash of its UID)."""
    return hashlib.sha256(series_uid.strip().encode()).hexdigest()[:SERIES_ID_CHARS]


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def is_dicom_file(path: Path) -> bool:
    """Part 10 files carry 'DICM' after a 128-byte preamble; we accept nothing else."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _read_header(path: Path) -> Dataset:
    try:
        with _quiet():
            return pydicom.dcmread(path, stop_before_pixels=True)
    except _READ_ERRORS as e:
        raise EdgeVLMError(
            f"unreadable DICOM header ({type(e).__name__}): the file is truncated or corrupt; "
            "re-export the series or remove this file",
            path,
        ) from None


def _floats(value: object, n: int) -> np.ndarray | None:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) else None


def _first(ds: Dataset | None, seq: str) -> Dataset | None:
    if ds is None or seq not in ds or not ds[seq].value:
        return None
    return ds[seq].value[0]


def _upper_values(value: object) -> list[str]:
    """A CS value (single or multi-valued) as upper-case strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value.upper()]
    try:
        return [str(v).upper() for v in value]  # type: ignore[union-attr]
    except TypeError:
        return [str(value).upper()]


def _images_of(ds: Dataset, path: str) -> list[_Image]:
    """Geometry and rescale per image; multi-frame files read per-frame then shared functional groups."""
    localizer = "LOCALIZER" in _upper_values(ds.get("ImageType"))
    n_frames = int(ds.get("NumberOfFrames") or 1)
    top_spacing = _floats(ds.get("PixelSpacing"), 2)
    top_slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    top_intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if n_frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        return [
            _Image(
                path=path,
                frame=None,
                position=_floats(ds.get("ImagePositionPatient"), 3),
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),
                pixel_spacing=None if top_spacing is None else (float(top_spacing[0]), float(top_spacing[1])),
                slope=top_slope,
                intercept=top_intercept,
                localizer=localizer,
            )
        ]
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    images = []
    for i in range(n_frames):
        frame_groups = per_frame[i] if i < len(per_frame) else None

        def item(seq: str, fg: Dataset | None = frame_groups) -> Dataset | None:
            # A functional group sits in the per-frame sequence or, when equal for all frames, the shared one.
            return _first(fg, seq) or _first(shared, seq)

        pos, ori, meas, pvt = (
            item("PlanePositionSequence"),
            item("PlaneOrientationSequence"),
            item("PixelMeasuresSequence"),
            item("PixelValueTransformationSequence"),
        )
        spacing = _floats(meas.get("PixelSpacing"), 2) if meas is not None else top_spacing
        frame_type = item("CTImageFrameTypeSequence") or item("MRImageFrameTypeSequence")
        frame_is_localizer = frame_type is not None and "LOCALIZER" in _upper_values(frame_type.get("FrameType"))
        images.append(
            _Image(
                path=path,
                frame=i,
                position=None if pos is None else _floats(pos.get("ImagePositionPatient"), 3),
                orientation=None if ori is None else _floats(ori.get("ImageOrientationPatient"), 6),
                pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
                slope=float(pvt.get("RescaleSlope", 1.0)) if pvt is not None else top_slope,
                intercept=float(pvt.get("RescaleIntercept", 0.0)) if pvt is not None else top_intercept,
                localizer=localizer or frame_is_localizer,
            )
        )
    return images


def _dicom_files(folder: Path, recursive: bool) -> tuple[list[Path], int]:
    """DICOM files under `folder` (sorted for determinism) and the count of other files skipped."""
    walker = (
        ((Path(root), sorted(files)) for root, _dirs, files in sorted(os.walk(folder)))
        if recursive
        else [(folder, sorted(p.name for p in folder.iterdir() if p.is_file()))]
    )
    found, other = [], 0
    for root, names in walker:
        for name in names:
            p = root / name
            if is_dicom_file(p):
                found.append(p)
            else:
                other += 1
    return found, other


def scan(paths: list[Path], where: Path, strict: bool = True) -> list[_Series]:
    """Read headers only and group the image files by SeriesInstanceUID.

    strict=False skips files whose header cannot be read or interpreted (used for the siblings of one
    file, which may belong to other, unrelated series); strict=True reports them.
    """
    by_uid: dict[str, _Series] = {}
    for p in paths:
        try:
            with _quiet():
                _add_file(by_uid, p)
        except EdgeVLMError:
            if strict:
                raise
    if not by_uid:
        raise EdgeVLMError(
            "no DICOM image files found (only non-image DICOM such as DICOMDIR, reports or plans); "
            "pass the folder that holds the image series",
            where,
        )
    return list(by_uid.values())


def _add_file(by_uid: dict[str, _Series], p: Path) -> None:
    ds = _read_header(p)
    # Image IODs always carry Rows; DICOMDIR, reports, plans and the like do not and are skipped.
    if "Rows" not in ds or "Columns" not in ds:
        if "Image Storage" in UID(str(ds.file_meta.get("MediaStorageSOPClassUID", ""))).name:
            # pydicom stops quietly at the end of a cut file; an image header without Rows is one.
            raise EdgeVLMError(
                "image header ends early: the file is truncated or corrupt; re-export the series or "
                "remove this file",
                p,
            )
        return
    try:
        uid = str(ds.get("SeriesInstanceUID") or f"no-series-uid:{p.parent}")
        n_frames = int(ds.get("NumberOfFrames") or 1)
        images = _images_of(ds, str(p))
        rows, cols = int(ds.Rows), int(ds.Columns)
        sbs = ds.get("SpacingBetweenSlices")
        spacing_between = float(sbs) if sbs not in (None, "") else None
    except _READ_ERRORS as e:
        raise EdgeVLMError(
            f"invalid DICOM header value ({type(e).__name__}); re-export the series or remove this file", p
        ) from None
    s = by_uid.get(uid)
    if s is None:
        s = by_uid[uid] = _Series(
            uid=uid,
            modality=str(ds.get("Modality") or "OT").upper(),
            description=str(ds.get("SeriesDescription") or "").strip(),
            rows=rows,
            cols=cols,
            multiframe=n_frames > 1,
            spacing_between_slices=spacing_between,
        )
    s.multiframe = s.multiframe or n_frames > 1
    s.files.append(str(p))
    s.images.extend(images)


def _orientation_key(o: np.ndarray) -> tuple[float, ...]:
    return tuple(np.round(o, 2).tolist())


def _volume_images(s: _Series) -> tuple[list[_Image], int, str]:
    """The images forming the volume, how many were skipped, and a note when no volume can be formed.

    Localizers (ImageType LOCALIZER) are dropped. Images whose orientation differs from the majority
    are dropped as scouts when the majority holds at least two thirds of the images; otherwise the
    series mixes orientations and is refused rather than guessed.
    """
    images = [im for im in s.images if not im.localizer]
    skipped = len(s.images) - len(images)
    if not images:
        return [], skipped, "localizer only"
    with_geometry = [im for im in images if im.orientation is not None and im.position is not None]
    if len(with_geometry) < len(images):
        if s.multiframe and len(s.files) == 1 and not with_geometry:
            return images, skipped, ""  # loader falls back to the file's spacing, with a warning
        return [], skipped, "no slice position/orientation"
    groups: dict[tuple[float, ...], list[_Image]] = {}
    for im in images:
        groups.setdefault(_orientation_key(im.orientation), []).append(im)  # type: ignore[arg-type]
    majority = max(groups.values(), key=len)
    if len(majority) * 3 < len(images) * 2:
        return [], skipped, f"mixed orientations ({len(groups)} different)"
    skipped += len(images) - len(majority)
    if len(majority) < 2:
        return majority, skipped, "single 2D image"
    return majority, skipped, ""


def series_info(s: _Series) -> SeriesInfo:
    images, skipped, note = _volume_images(s)
    spacing_z: float | None = None
    orientation = "mixed" if note.startswith("mixed") else "unknown"
    if images and images[0].orientation is not None:
        orientation = orientation_label(images[0].orientation)
        if len(images) > 1 and all(im.position is not None for im in images):
            normal = unit_axes(images[0].orientation)[2]
            along = np.sort([float(im.position @ normal) for im in images])  # type: ignore[operator]
            spacing_z = round(float(np.median(np.diff(along))), 4)
    px = images[0].pixel_spacing if images else None
    return SeriesInfo(
        series_id=s.series_id,
        modality=s.modality,
        description=s.description,
        slices=len(images),
        rows=s.rows,
        cols=s.cols,
        spacing_mm=(spacing_z, float(px[0]) if px else None, float(px[1]) if px else None),
        orientation=orientation,
        files=len(s.files),
        multiframe=s.multiframe,
        skipped=skipped,
        note=note,
    )


_MODALITY_RANK = {"CT": 2, "MR": 1}


def _score(info: SeriesInfo) -> tuple:
    thinnest = -(info.spacing_mm[0] or 1e9)
    return (_MODALITY_RANK.get(info.modality, 0), info.orientation == "axial", info.slices, round(thinnest, 2))


def _describe(info: SeriesInfo) -> str:
    desc = f" '{info.description}'" if info.description else ""
    extra = f", {info.note}" if info.note else ""
    return f"{info.series_id} ({info.modality}{desc}, {info.slices} slices{extra})"


def choose_series(series: list[_Series], selector: str | None, where: Path) -> _Series:
    """Pick the series to load.

    With `selector`: the series whose short id or full SeriesInstanceUID matches. Without: among the
    series that form a 3D volume, the best by (CT over MR over other modalities, axial over other
    planes, most slices, thinnest slice spacing). When two series tie on all four, the choice would be
    arbitrary (e.g. the same scan reconstructed with two kernels), so we raise and list the choices.
    """
    infos = [series_info(s) for s in series]
    if selector is not None:
        wanted = selector.strip()
        for s, info in zip(series, infos, strict=True):
            if wanted in (info.series_id, s.uid):
                return s
        choices = ", ".join(_describe(i) for i in infos)
        raise EdgeVLMError(f"no series '{wanted}' here; choose one of: {choices}", where)
    volumes = [(s, i) for s, i in zip(series, infos, strict=True) if not i.note]
    if not volumes:
        if len(infos) == 1:
            return series[0]  # let the loader raise its specific error (2D image, mixed orientations...)
        choices = ", ".join(_describe(i) for i in infos)
        raise EdgeVLMError(f"no series here forms a 3D volume: {choices}", where)
    best = max(_score(i) for _, i in volumes)
    top = [(s, i) for s, i in volumes if _score(i) == best]
    if len(top) > 1:
        choices = ", ".join(_describe(i) for _, i in top)
        raise EdgeVLMError(
            f"{len(top)} series are equally good candidates: {choices}; pick one with --series ID", where
        )
    return top[0][0]


def auto_choice_id(infos: list[SeriesInfo]) -> str | None:
    """The short id `load_study` picks without a selector, or None when it would refuse to pick."""
    volumes = [i for i in infos if not i.note]
    if not volumes:
        return infos[0].series_id if len(infos) == 1 and not infos[0].note else None
    best = max(_score(i) for i in volumes)
    top = [i for i in volumes if _score(i) == best]
    return top[0].series_id if len(top) == 1 else None


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """Headers-only listing of the DICOM series under `folder` (searched recursively).

    Sorted by the same rule `load_study` uses to pick a series, best first.
    """
    folder = Path(folder)
    series = _scan_path(folder)
    return sorted((series_info(s) for s in series), key=_score, reverse=True)


def _scan_path(path: Path) -> list[_Series]:
    if not path.exists():
        raise EdgeVLMError("no such file or folder; check the path", path)
    if path.is_file():
        if not is_dicom_file(path):
            raise EdgeVLMError("not a DICOM file (no 'DICM' marker after the 128-byte preamble)", path)
        return scan([path], path)
    files, other = _dicom_files(path, recursive=True)
    if not files:
        what = f"{other} files, none of them DICOM" if other else "the folder is empty"
        raise EdgeVLMError(f"no DICOM files found ({what}); pass the folder that holds the series", path)
    return scan(files, path)


# --- loading -----------------------------------------------------------------------------------------


def _check_decoder(ds: Dataset, path: str) -> None:
    ts = UID(ds.file_meta.get("TransferSyntaxUID") or pydicom.uid.ImplicitVRLittleEndian)
    if not ts.is_compressed:
        return
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise EdgeVLMError(
            f"pixel data uses {ts.name or str(ts)}, which no installed decoder supports; convert the series "
            "to uncompressed DICOM (e.g. gdcmconv --raw)",
            path,
        ) from None
    if not decoder.is_available:
        raise EdgeVLMError(
            f"pixel data is compressed ({ts.name}) and no decoder is installed; install one with "
            f"`{JPEG_EXTRA}` (or python-gdcm)",
            path,
        )


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _decode(path: str) -> tuple[np.ndarray, Dataset]:
    """(frames, rows, cols) stored values of one file, with its dataset (pixels included)."""
    try:
        with _quiet():
            ds = pydicom.dcmread(path)
    except _READ_ERRORS as e:
        raise EdgeVLMError(
            f"unreadable DICOM file ({type(e).__name__}): truncated or corrupt; re-export the series",
            path,
        ) from None
    if "PixelData" not in ds:
        raise EdgeVLMError("no pixel data in this DICOM file (not an image); pass an image series", path)
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise EdgeVLMError(
            f"colour image ({ds.get('PhotometricInterpretation')}); only greyscale CT/MR volumes are supported",
            path,
        )
    _check_decoder(ds, path)
    try:
        with _quiet():
            arr = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError) as e:
        raise EdgeVLMError(
            f"cannot decode pixel data ({type(e).__name__}): truncated or corrupt; re-export the series",
            path,
        ) from None
    return arr.reshape(-1, arr.shape[-2], arr.shape[-1]), ds


def load_series(s: _Series, where: Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    images, skipped, note = _volume_images(s)
    if note == "single 2D image" or (not note and len(images) < 2):
        raise EdgeVLMError(
            "a single 2D image, but the model needs a 3D volume; pass the folder holding every slice of "
            "the series",
            where,
        )
    if note:
        raise EdgeVLMError(f"series {s.series_id} cannot form a 3D volume: {note}", where)
    n_voxels = len(images) * s.rows * s.cols
    if n_voxels > max_voxels:
        raise EdgeVLMError(
            f"volume of {len(images)} x {s.rows} x {s.cols} = {n_voxels:,} voxels exceeds the memory budget "
            f"of {max_voxels:,} voxels; pass a larger max_voxels or a smaller series",
            where,
        )
    warnings_: list[str] = []
    if skipped:
        warnings_.append(f"skipped {skipped} localizer/scout image(s) not in the volume's orientation")

    spacings = {im.pixel_spacing for im in images}
    if len(spacings) > 1:
        raise EdgeVLMError("slices have different PixelSpacing; this is not one volume", where)
    pixel_spacing = images[0].pixel_spacing
    if images[0].position is None:  # multi-frame file with no plane position/orientation at all
        dz = s.spacing_between_slices or 1.0
        py, px = pixel_spacing or (1.0, 1.0)
        warnings_.append(
            f"no plane position/orientation in the file: assumed axial slices in file order, spacing "
            f"(z, y, x) = ({dz}, {py}, {px}) mm"
        )
        order = np.arange(len(images))
        spacing = (dz, py, px)
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
        direction = np.eye(3)
    else:
        if pixel_spacing is None:
            raise EdgeVLMError("slices lack PixelSpacing; cannot place voxels in millimetres", where)
        stack = stack_slices(np.stack([im.position for im in images]), images[0].orientation, str(where))
        warnings_.extend(stack.warnings)
        order, origin, direction = stack.order, stack.origin_mm, stack.direction
        spacing = (stack.spacing_z_mm, pixel_spacing[0], pixel_spacing[1])

    # One float32 allocation of the final size; each file is decoded once and its frames dropped in place.
    out = np.empty((len(images), s.rows, s.cols), dtype=np.float32)
    slot_of = {id(images[k]): z for z, k in enumerate(order)}
    by_path: dict[str, list[_Image]] = {}
    for im in images:
        by_path.setdefault(im.path, []).append(im)
    inverted = False
    for path, path_images in by_path.items():
        frames, ds = _decode(path)
        if frames.shape[1:] != (s.rows, s.cols):
            raise EdgeVLMError(
                f"image is {frames.shape[1]} x {frames.shape[2]} but the series is {s.rows} x {s.cols}", path
            )
        # MONOCHROME1 means "low values display white". That is a display rule applied after the
        # modality LUT, so CT values in HU are kept as they are; for other data (no HU scale) we
        # invert the stored values so that higher always means brighter, as models were trained on.
        invert = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1" and s.modality != "CT"
        lo, hi = _stored_range(ds)
        for im in path_images:
            stored = frames[im.frame or 0]
            plane = out[slot_of[id(im)]]
            plane[...] = stored
            if invert:
                np.subtract(lo + hi, plane, out=plane)
                inverted = True
            if im.slope != 1.0:
                plane *= np.float32(im.slope)
            if im.intercept != 0.0:
                plane += np.float32(im.intercept)
    if inverted:
        warnings_.append("MONOCHROME1 pixels inverted so that higher values are brighter")
    return Volume(
        array=out,
        spacing_mm=spacing,
        origin_mm=origin,
        direction=direction,
        modality=s.modality,
        series_description=s.description,
        units="HU" if s.modality == "CT" else "intensity",
        warnings=warnings_,
    )


def load_dicom(path: Path, series: str | None, max_voxels: int) -> Volume:
    """A folder (any number of series), a multi-frame file, or one file of a series (siblings used)."""
    if path.is_dir():
        found = _scan_path(path)
        return load_series(choose_series(found, series, path), path, max_voxels)
    if not is_dicom_file(path):
        raise EdgeVLMError(
            "not a DICOM file (no 'DICM' marker) and not .nii/.nii.gz/.nrrd; pass a DICOM folder or file", path
        )
    header = _read_header(path)
    if "Rows" not in header:
        raise EdgeVLMError("no pixel data in this DICOM file (not an image); pass an image series", path)
    if int(header.get("NumberOfFrames") or 1) > 1:
        return load_series(scan([path], path)[0], path, max_voxels)
    # One slice of a classic series: gather the other slices of the same series from its folder.
    uid = str(header.get("SeriesInstanceUID") or f"no-series-uid:{path.parent}")
    siblings, _ = _dicom_files(path.parent, recursive=False)
    same = [s for s in scan(siblings, path.parent, strict=False) if s.uid == uid]
    if not same:  # the file itself could not be interpreted: report it
        scan([path], path)
    return load_series(same[0], path, max_voxels)
