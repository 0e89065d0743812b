"""The finding schema shared by the synthetic generator (`edgevlm.data`) and the metrics (`edgevlm.eval`).

A `Finding` holds only clinical attributes (type, side, lobe, size, severity, density); where the
generator drew it in the phantom lives in `geometry`, which is excluded from equality so that a finding
parsed from report text compares equal to the ground truth it describes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

NODULE = "nodule"
MASS = "mass"
PLEURAL_EFFUSION = "pleural_effusion"
PNEUMOTHORAX = "pneumothorax"
CONSOLIDATION = "consolidation"
CARDIOMEGALY = "cardiomegaly"
EMPHYSEMA = "emphysema"

FINDING_TYPES: tuple[str, ...] = (
    NODULE,
    MASS,
    PLEURAL_EFFUSION,
    PNEUMOTHORAX,
    CONSOLIDATION,
    CARDIOMEGALY,
    EMPHYSEMA,
)
# Findings whose side is part of their identity (a left effusion is not a right effusion).
LATERAL_TYPES: tuple[str, ...] = (PLEURAL_EFFUSION, PNEUMOTHORAX)
# Findings that sit in one lobe; their side follows from the lobe.
LOBAR_TYPES: tuple[str, ...] = (NODULE, MASS, CONSOLIDATION)

LOBES: tuple[str, ...] = ("RUL", "RML", "RLL", "LUL", "LLL")
LOBE_NAMES: dict[str, str] = {
    "RUL": "right upper lobe",
    "RML": "right middle lobe",
    "RLL": "right lower lobe",
    "LUL": "left upper lobe",
    "LLL": "left lower lobe",
}
SIDES: tuple[str, ...] = ("left", "right", "bilateral")
SEVERITIES: tuple[str, ...] = ("small", "moderate", "large")
DENSITIES: tuple[str, ...] = ("solid", "ground-glass")


def lobe_side(lobe: str) -> str:
    """'RUL' -> 'right', 'LLL' -> 'left'."""
    if lobe not in LOBES:
        raise ValueError(f"unknown lobe {lobe!r}; expected one of {LOBES}")
    return "right" if lobe.startswith("R") else "left"


@dataclass
class Finding:
    type: str
    side: str | None = None  # left / right / bilateral (lobar findings: derived from lobe)
    lobe: str | None = None  # RUL RML RLL LUL LLL
    size_mm: float | None = None  # longest diameter (nodule, mass)
    severity: str | None = None  # small / moderate / large (pleural effusion)
    density: str | None = None  # solid / ground-glass (nodule)
    # Where the generator placed it (centre_mm LPS, radii, ...); not a clinical attribute.
    geometry: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.type not in FINDING_TYPES:
            raise ValueError(f"unknown finding type {self.type!r}; expected one of {FINDING_TYPES}")
        if self.lobe is not None and self.side is None:
            self.side = lobe_side(self.lobe)
        if self.size_mm is not None:
            self.size_mm = float(self.size_mm)

    def to_dict(self, with_geometry: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not with_geometry:
            d.pop("geometry")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        known = {k: d[k] for k in ("type", "side", "lobe", "size_mm", "severity", "density") if k in d}
        return cls(**known, geometry=dict(d.get("geometry") or {}))

    def key(self) -> tuple:
        """The clinical identity, hashable and order-stable (used for sorting and comparisons)."""
        return (
            self.type,
            self.side or "",
            self.lobe or "",
            -1.0 if self.size_mm is None else self.size_mm,
            self.severity or "",
            self.density or "",
        )


def sorted_findings(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=Finding.key)
