"""Slice stacking geometry shared by classic DICOM series and multi-frame files.

Slices are ordered by their position along the slice normal, never by InstanceNumber: instance numbers
are assigned by the scanner or the archive and are not guaranteed to follow anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevlm.errors import EdgeVLMError

# Relative deviation of one slice gap from the median gap. Up to 1 % is rounding in the headers; up to
# 20 % is reconstruction jitter (warned, the mean spacing is used); above that a slice is missing or the
# series mixes spacings, and stacking it on a regular grid would stretch anatomy, so it is an error.
SPACING_JITTER_WARN = 0.01
SPACING_GAP_ERROR = 0.20
# Smaller than this (in mm) two slices are taken to be at the same place.
SAME_POSITION_MM = 0.01
# Angle between the slice-to-slice step and the slice normal above which we report gantry tilt.
TILT_WARN_DEG = 0.5


@dataclass(frozen=True)
class Stack:
    order: np.ndarray  # indices into the input slices, in ascending position along the normal
    spacing_z_mm: float
    origin_mm: tuple[float, float, float]  # LPS position of the first slice (in `order`)
    direction: np.ndarray  # rows: x (row direction), y (column direction), normal
    warnings: list[str]


def unit_axes(orientation: np.ndarray) -> np.ndarray:
    """(3, 3) rows: x axis (along a row), y axis (down a column), slice normal, from ImageOrientationPatient."""
    o = np.asarray(orientation, dtype=np.float64).reshape(2, 3)
    x = o[0] / np.linalg.norm(o[0])
    y = o[1] / np.linalg.norm(o[1])
    return np.stack([x, y, np.cross(x, y)])


def orientation_label(orientation: np.ndarray | None) -> str:
    """axial / coronal / sagittal from the dominant component of the slice normal; oblique beyond ~25°."""
    if orientation is None:
        return "unknown"
    normal = np.abs(unit_axes(orientation)[2])
    if normal.max() < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def stack_slices(positions_mm: np.ndarray, orientation: np.ndarray, where: str) -> Stack:
    """Order slices along their normal and check the spacing; `where` names the files in errors."""
    axes = unit_axes(orientation)
    normal = axes[2]
    positions_mm = np.asarray(positions_mm, dtype=np.float64).reshape(-1, 3)
    along = positions_mm @ normal
    order = np.argsort(along, kind="stable")
    s = along[order]
    gaps = np.diff(s)
    warnings: list[str] = []

    n_same = int(np.sum(gaps < SAME_POSITION_MM))
    if n_same:
        raise EdgeVLMError(
            f"{n_same + 1} slices share a position: the series holds several volumes (echoes, phases or "
            "repeats); split it and pass one volume",
            where,
        )
    median = float(np.median(gaps))
    deviation = np.abs(gaps - median) / median
    worst = int(np.argmax(deviation))
    if deviation[worst] > SPACING_GAP_ERROR:
        raise EdgeVLMError(
            f"uneven slice spacing: a {gaps[worst]:.2f} mm gap at slice {worst + 1} of {len(s)} where the "
            f"median is {median:.2f} mm (missing slices?); re-export the complete series",
            where,
        )
    if deviation[worst] > SPACING_JITTER_WARN:
        warnings.append(
            f"slice spacing varies from {gaps.min():.3f} to {gaps.max():.3f} mm; "
            f"stacked on the mean spacing {(s[-1] - s[0]) / (len(s) - 1):.3f} mm"
        )

    # Gantry tilt: successive slices are shifted in-plane, so the step between them is not along the normal.
    step = positions_mm[order[-1]] - positions_mm[order[0]]
    in_plane = np.linalg.norm(step - (step @ normal) * normal)
    tilt_deg = float(np.degrees(np.arctan2(in_plane, abs(step @ normal))))
    if tilt_deg > TILT_WARN_DEG:
        warnings.append(
            f"gantry tilt of {tilt_deg:.1f} degrees detected (slice positions are not along the slice "
            "normal); slices are stacked along the normal without de-shearing"
        )

    origin = positions_mm[order[0]]
    return Stack(
        order=order,
        spacing_z_mm=float((s[-1] - s[0]) / (len(s) - 1)),
        origin_mm=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=axes,
        warnings=warnings,
    )
