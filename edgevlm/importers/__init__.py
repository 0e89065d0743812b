"""Importers: public 3D-MedVLM checkpoints -> edgevlm's model family (DESIGN.md decision 1).

Each importer module offers `detect(path) -> bool` and `plan(path) -> ImportPlan`. `plan_import` is the
one hook `edgevlm.checkpoint` calls: it returns None for edgevlm's own formats, so those load as before.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from edgevlm.errors import EdgeVLMError
from edgevlm.importers import m3d
from edgevlm.importers.common import ImportPlan

# name (the CLI's `--from NAME`) -> importer module
IMPORTERS: dict[str, ModuleType] = {m3d.NAME: m3d}


def detect_importer(path: str | Path) -> str | None:
    """Name of the importer that recognises `path`, or None (an edgevlm checkpoint, or unknown)."""
    path = Path(path)
    for name, module in IMPORTERS.items():
        if module.detect(path):
            return name
    return None


def plan_import(path: str | Path, from_: str | None = None) -> ImportPlan | None:
    """The import plan for `path`: forced by `from_` (an IMPORTERS name), else auto-detected; None if
    `path` is not a public checkpoint an importer recognises."""
    path = Path(path)
    if from_ is None:
        from_ = detect_importer(path)
        if from_ is None:
            return None
    elif from_ not in IMPORTERS:
        raise EdgeVLMError(f"unknown --from {from_!r} (importers: {', '.join(IMPORTERS)})", path)
    return IMPORTERS[from_].plan(path)


__all__ = ["IMPORTERS", "ImportPlan", "detect_importer", "plan_import"]
