"""Calibration sets: studies -> the bundle's own preprocessing -> (N, 1, D, H, W) float32 volumes.

Sources: `synthetic:N` (edgevlm.data chest CT) or a folder of studies (each immediate entry a DICOM
folder, a DICOM file or a NIfTI/NRRD file, read with `edgevlm.io.load_study`).

Seed ranges of the synthetic studies, kept apart so no study is used twice for different purposes:
    training            [0, 1_000_000)          (edgevlm.train: seeds below HELDOUT_SEED_START)
    eval / export gate  [1_000_000, 2_000_000)  (edgevlm.eval synthetic_studies; GATE_SEED_START)
    calibration         [2_000_000, ...)        (CALIB_SEED_START)

Synthetic studies are rendered over their full physical extent on a grid twice the model's (capped at
the native series size), then passed through the bundle's recipe (orientation, HU window, resampling,
fit to grid) exactly as a loaded series is. Rendering the 512x512 native series instead costs ~8 s a
study for the same voxels after resampling (the phantom is defined in millimetres).

No PHI leaves this module: a study is recorded by its index, the sha256 of its preprocessed array and
(synthetic only) its seed; never a path, a folder name or a DICOM tag.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgevlm.errors import EdgeVLMError
from edgevlm.train import HELDOUT_SEED_START

CALIB_SEED_START = 2_000_000
GATE_SEED_START = HELDOUT_SEED_START
_STUDY_SUFFIXES = (".dcm", ".nii", ".nii.gz", ".nrrd", ".nhdr")


@dataclass
class CalibrationSet:
    volumes: np.ndarray  # (N, 1, D, H, W) float32, preprocessed with the recipe below
    source: str  # "synthetic:N (seeds a..b)" or "folder (N studies)"; never a path
    recipe_name: str
    study_sha256: list[str]  # sha256 of each preprocessed float32 array (C order)
    seeds: list[int] | None = None
    truths: list[dict[str, Any]] = field(default_factory=list, repr=False)  # ground truth (gate studies only)

    def __len__(self) -> int:
        return len(self.volumes)

    def record(self) -> dict[str, Any]:
        """The part of calibration.json that describes the studies (no PHI)."""
        return {"source": self.source, "count": len(self), "recipe": self.recipe_name,
                "shape": list(self.volumes.shape[1:]), "seeds": self.seeds,
                "studies": [{"index": i, "sha256": h} for i, h in enumerate(self.study_sha256)]}


def array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def render_synthetic(seed: int, recipe: Any) -> tuple[np.ndarray, Any]:
    """(preprocessed (D, H, W) float32, StudySpec) for one synthetic study seed (see the module docstring)."""
    from edgevlm.data import render_volume, sample_study
    from edgevlm.preprocess import preprocess
    from edgevlm.volume import Volume

    spec = sample_study(seed)
    extent_mm = [n * s for n, s in zip(spec.native_shape_zyx, spec.native_spacing_mm, strict=True)]
    shape = tuple(max(8, min(int(n), 2 * g)) for n, g in zip(spec.native_shape_zyx, recipe.grid, strict=True))
    spacing_mm = tuple(e / s for e, s in zip(extent_mm, shape, strict=True))
    hu = render_volume(spec, shape, spacing_mm)
    return preprocess(Volume(hu, spacing_mm), recipe), spec


def _study_path(entry: Path) -> Path:
    """What load_study should read for one entry: `<id>/dicom/` (edgevlm studies make-synthetic), a folder
    holding one NIfTI/NRRD file, or the entry itself (a DICOM folder or a volume file)."""
    if entry.is_dir():
        if (entry / "dicom").is_dir():
            return entry / "dicom"
        volumes = [p for p in entry.iterdir() if p.name.lower().endswith(_STUDY_SUFFIXES[1:])]
        if len(volumes) == 1:
            return volumes[0]
    return entry


def _folder_entries(folder: Path) -> list[Path]:
    entries = [_study_path(p) for p in sorted(folder.iterdir()) if not p.name.startswith(".")
               and (p.is_dir() or p.name.lower().endswith(_STUDY_SUFFIXES))]
    if not entries:
        raise EdgeVLMError("no studies found (expected sub-folders of DICOM files or NIfTI/NRRD files)", folder)
    return entries


def _progress(total: int, label: str, enabled: bool) -> tuple[Any, Callable[[], None]]:
    """A rich progress bar on stderr (or nothing); returns (context manager, advance)."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext(), lambda: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)
    task = bar.add_task(label, total=total)
    return bar, lambda: bar.advance(task)


def parse_source(source: str) -> tuple[str, int | Path]:
    """`synthetic:N` -> ("synthetic", N); a folder -> ("folder", path). Raises EdgeVLMError otherwise."""
    from edgevlm.data.source import parse_source as parse

    parsed = parse(source, "--calib")
    return ("synthetic", parsed) if isinstance(parsed, int) else ("folder", parsed)


def build_calibration_set(source: str, recipe: Any, seed_start: int = CALIB_SEED_START, progress: bool = True,
                          with_truth: bool = False) -> CalibrationSet:
    """Studies from `source` through `recipe`; `with_truth` keeps synthetic ground truth (gate studies)."""
    from edgevlm.io import load_study
    from edgevlm.preprocess import preprocess

    kind, value = parse_source(source)
    arrays: list[np.ndarray] = []
    truths: list[dict[str, Any]] = []
    if kind == "synthetic":
        from edgevlm.data.reports import ground_truth

        n = int(value)  # type: ignore[arg-type]
        seeds = list(range(seed_start, seed_start + n))
        bar, advance = _progress(n, "calibration studies", progress)
        with bar:
            for s in seeds:
                array, spec = render_synthetic(s, recipe)
                arrays.append(array)
                if with_truth:
                    truths.append(ground_truth(spec))
                advance()
        label = f"synthetic:{n} (edgevlm.data seeds {seeds[0]}..{seeds[-1]})"
    else:
        entries = _folder_entries(Path(value))  # type: ignore[arg-type]
        seeds = None
        bar, advance = _progress(len(entries), "calibration studies", progress)
        with bar:
            for i, entry in enumerate(entries):
                try:
                    arrays.append(preprocess(load_study(entry), recipe))
                except EdgeVLMError as e:  # name the study by index: its folder name may hold a name
                    raise EdgeVLMError(f"calibration study #{i} cannot be read: {e}") from None
                advance()
        label = f"folder ({len(entries)} studies)"
    volumes = np.stack(arrays)[:, None].astype(np.float32)
    return CalibrationSet(volumes, label, recipe.name, [array_sha256(a) for a in arrays], seeds, truths)


def iter_batches(volumes: np.ndarray, batch: int = 1) -> Iterator[np.ndarray]:
    for i in range(0, len(volumes), batch):
        yield volumes[i:i + batch]
