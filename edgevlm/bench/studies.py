"""The study set a benchmark runs on: resolved to folders on disk, hashed, and named without PHI.

Latency is measured end to end from the study on disk (DICOM read included), so `synthetic:N` studies
are first written as real DICOM series (held-out seeds, `edgevlm.train.HELDOUT_SEED_START` on) into a
scratch folder. Studies are keyed by a hash of their id: ids of real studies can be accession numbers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevlm.bench.fingerprint import path_tag, sha256_text
from edgevlm.checkpoint import file_sha256
from edgevlm.errors import EdgeVLMError

HELDOUT_SEED_START = 1_000_000  # edgevlm.train.HELDOUT_SEED_START (imported lazily there: torch)


@dataclass
class StudyRef:
    key: str  # sha256(study id)[:12]
    path: str  # what load_study reads (a DICOM folder, a file)
    truth_path: str | None  # ground_truth.json, when the set has ground truth

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "path": self.path, "truth_path": self.truth_path}


def parse_source(source: str) -> int | None:
    """N for `synthetic:N`, None for a folder (checked to exist)."""
    from edgevlm.data.source import parse_source as parse

    parsed = parse(source, "--studies")
    return parsed if isinstance(parsed, int) else None


def write_synthetic(n: int, scratch: Path, matrix: int = 512) -> Path:
    """n held-out synthetic studies as DICOM + ground truth under `scratch` (the set `edgevlm eval` uses).

    `matrix` below 512 shrinks the series (coarser pixels, 5 mm slices): a smoke-test set, not a
    realistic one; the report says which was used.
    """
    from edgevlm.data import SyntheticConfig
    from edgevlm.data.dicom import make_synthetic

    config = SyntheticConfig()
    if matrix != 512:
        fov_mm = 512 * 0.7  # keep the phantom's field of view; only the sampling gets coarser
        config = SyntheticConfig(matrix=matrix, pixel_spacing_mm=(fov_mm / matrix, fov_mm / matrix * 1.05),
                                 slice_spacings_mm=(5.0,))
    make_synthetic(scratch, n, HELDOUT_SEED_START, config=config)
    return scratch


def find_studies(folder: Path) -> list[StudyRef]:
    """Studies in a folder: `<id>/ground_truth.json` + `<id>/dicom/` (as `studies make-synthetic` writes),
    or, without ground truth, every sub-folder or file (each one study for `edgevlm infer`)."""
    if not folder.is_dir():
        raise EdgeVLMError("--studies must be a folder of studies or synthetic:N", folder)
    truths = sorted(folder.glob("*/ground_truth.json"))
    refs = []
    for gt in truths:
        study_id = json.loads(gt.read_text()).get("study_id", gt.parent.name)
        dicom = gt.parent / "dicom"
        refs.append(StudyRef(sha256_text(str(study_id))[:12], str(dicom if dicom.is_dir() else gt.parent), str(gt)))
    if not refs:
        refs = [StudyRef(sha256_text(p.name)[:12], str(p), None)
                for p in sorted(folder.iterdir()) if not p.name.startswith(".") and p.name != "studies.json"]
    if not refs:
        raise EdgeVLMError("no studies found: expected <study>/ground_truth.json + <study>/dicom/, or one "
                           "sub-folder or file per study", folder)
    return refs


def content_sha256(refs: list[StudyRef]) -> str:
    """sha256 over the studies' file contents: equal sets hash equal wherever and under whatever names
    they are stored. Per study: sorted sha256s of its files (+ ground truth); then sorted over studies."""
    per_study = []
    for ref in refs:
        p = Path(ref.path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        hashes = sorted(file_sha256(f) for f in files)
        if ref.truth_path:
            hashes.append("truth:" + file_sha256(ref.truth_path))
        per_study.append(sha256_text("\n".join(hashes)))
    return hashlib.sha256("\n".join(sorted(per_study)).encode()).hexdigest()


def describe(source: str, refs: list[StudyRef], matrix: int) -> dict[str, Any]:
    """The study_set record of results.json (no path: a folder is named by its tag only)."""
    n = parse_source(source)
    synthetic = n is not None
    return {
        "source": "synthetic" if synthetic else "folder",
        "description": (f"synthetic:{n} (held-out seeds {HELDOUT_SEED_START}..{HELDOUT_SEED_START + n - 1}, "
                        f"{matrix}x{matrix} matrix, DICOM)") if synthetic else f"folder {path_tag(source)}",
        "n_studies": len(refs),
        "has_ground_truth": all(r.truth_path for r in refs),
        "content_sha256": content_sha256(refs),
        "study_keys": [r.key for r in refs],
    }
