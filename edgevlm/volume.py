"""`Volume`: the one in-memory form of a study, whatever file it came from.

Axes are (z, y, x) = (slice, row, column), the order numpy and torch use for a (D, H, W) grid.
Geometry follows DICOM's patient coordinate system (LPS, millimetres). A Volume never carries patient
identifiers: loaders copy only the fields below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    array: np.ndarray  # (D, H, W) float32: HU for CT, scanner intensity otherwise
    spacing_mm: tuple[float, float, float]  # (z, y, x) distance between voxel centres
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # LPS (x, y, z) of voxel [0, 0, 0]
    # Rows are the LPS unit vectors of the x (column), y (row) and z (slice) voxel axes.
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    modality: str = "CT"
    series_description: str = ""
    units: str = "HU"  # "HU" or "intensity"
    warnings: list[str] = field(default_factory=list)  # geometry notes: tilt, missing slices, ...

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be (D, H, W), got shape {self.array.shape}")
        self.spacing_mm = tuple(float(s) for s in self.spacing_mm)
        self.origin_mm = tuple(float(s) for s in self.origin_mm)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    def geometry(self) -> dict:
        """JSON-ready geometry summary (no identifiers), for logs, reports and bundles."""
        return {
            "shape_zyx": list(self.shape),
            "spacing_mm_zyx": [round(s, 4) for s in self.spacing_mm],
            "origin_mm_lps": [round(s, 3) for s in self.origin_mm],
            "direction": np.round(self.direction, 6).tolist(),
            "modality": self.modality,
            "series_description": self.series_description,
            "units": self.units,
            "warnings": list(self.warnings),
        }
