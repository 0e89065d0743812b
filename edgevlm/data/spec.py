"""Sampling one synthetic chest CT study: anatomy, acquisition and findings, all from one seed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgevlm.data.anatomy import Anatomy, Geometry
from edgevlm.data.findings import (
    CARDIOMEGALY,
    CONSOLIDATION,
    EMPHYSEMA,
    LOBES,
    MASS,
    NODULE,
    PLEURAL_EFFUSION,
    PNEUMOTHORAX,
    Finding,
    lobe_side,
)


@dataclass
class SyntheticConfig:
    normal_fraction: float = 0.3  # studies with no finding at all
    # Number of findings in an abnormal study: 1, 2, 3 with these probabilities.
    n_findings_probs: tuple[float, ...] = (0.45, 0.35, 0.20)
    type_weights: dict[str, float] = field(
        default_factory=lambda: {
            NODULE: 0.28,
            MASS: 0.08,
            PLEURAL_EFFUSION: 0.17,
            PNEUMOTHORAX: 0.11,
            CONSOLIDATION: 0.13,
            CARDIOMEGALY: 0.12,
            EMPHYSEMA: 0.11,
        }
    )
    max_nodules: int = 3
    # Solid nodules from 6 mm, ground-glass from 8 mm: smaller ones vanish at the demo grid
    # (2.8 mm pixels, 10 mm slices).
    nodule_size_mm: tuple[int, int] = (6, 30)
    ground_glass_min_mm: int = 8
    ground_glass_fraction: float = 0.3
    mass_size_mm: tuple[int, int] = (35, 65)
    slice_spacings_mm: tuple[float, ...] = (1.25, 2.0, 2.5, 3.0, 5.0)
    pixel_spacing_mm: tuple[float, float] = (0.6, 0.8)
    matrix: int = 512  # rows = columns of the native series


@dataclass
class StudySpec:
    study_id: str
    seed: int
    anatomy: Anatomy
    findings: list[Finding]
    slice_spacing_mm: float
    pixel_spacing_mm: float
    n_slices: int
    rows: int
    cols: int

    @property
    def is_normal(self) -> bool:
        return not self.findings

    @property
    def native_shape_zyx(self) -> tuple[int, int, int]:
        return (self.n_slices, self.rows, self.cols)

    @property
    def native_spacing_mm(self) -> tuple[float, float, float]:
        return (self.slice_spacing_mm, self.pixel_spacing_mm, self.pixel_spacing_mm)

    def native_origin_mm(self) -> tuple[float, float, float]:
        """LPS (x, y, z) of voxel [0, 0, 0] of the native series: the grid is centred on the patient."""
        return default_origin_mm(self.native_shape_zyx, self.native_spacing_mm)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_id": self.study_id,
            "seed": self.seed,
            "anatomy": self.anatomy.to_dict(),
            "findings": [f.to_dict() for f in self.findings],
            "slice_spacing_mm": self.slice_spacing_mm,
            "pixel_spacing_mm": self.pixel_spacing_mm,
            "n_slices": self.n_slices,
            "rows": self.rows,
            "cols": self.cols,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudySpec:
        return cls(
            study_id=d["study_id"],
            seed=int(d["seed"]),
            anatomy=Anatomy.from_dict(d["anatomy"]),
            findings=[Finding.from_dict(f) for f in d["findings"]],
            slice_spacing_mm=float(d["slice_spacing_mm"]),
            pixel_spacing_mm=float(d["pixel_spacing_mm"]),
            n_slices=int(d["n_slices"]),
            rows=int(d["rows"]),
            cols=int(d["cols"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> StudySpec:
        return cls.from_dict(json.loads(text))


def default_origin_mm(
    shape_zyx: tuple[int, int, int], spacing_mm: tuple[float, float, float]
) -> tuple[float, float, float]:
    """Origin (LPS x, y, z) that centres a grid on the patient (identity direction)."""
    d, h, w = shape_zyx
    sz, sy, sx = spacing_mm
    return (-(w - 1) / 2.0 * sx, -(h - 1) / 2.0 * sy, -(d - 1) / 2.0 * sz)


def study_id_for(seed: int) -> str:
    return f"SYN{seed:05d}"


def _r(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _sample_anatomy(rng: np.random.Generator, cardiomegaly: bool) -> tuple[Anatomy, float]:
    lung_len = _r(rng, 210.0, 265.0)
    extent = lung_len + 40.0  # scan range: 25 mm below the bases, 15 mm above the apices
    base_z = -extent / 2.0 + 25.0
    ctr = _r(rng, 0.55, 0.64) if cardiomegaly else _r(rng, 0.36, 0.46)
    body_ry = _r(rng, 95.0, 120.0)
    anatomy = Anatomy(
        body_rx_mm=_r(rng, 130.0, 162.0),
        body_ry_mm=body_ry,
        body_shape_p=_r(rng, 2.0, 2.6),
        fat_mm=_r(rng, 6.0, 22.0),
        muscle_mm=_r(rng, 7.0, 13.0),
        rib_mm=_r(rng, 8.0, 11.0),
        rib_period_mm=_r(rng, 22.0, 28.0),
        rib_width_mm=_r(rng, 8.0, 11.0),
        rib_phase_mm=_r(rng, 0.0, 28.0),
        mediastinum_halfwidth_mm=_r(rng, 24.0, 32.0),
        lung_apex_z_mm=base_z + lung_len,
        lung_base_z_mm=base_z,
        dome_height_mm=_r(rng, 18.0, 35.0),
        right_dome_extra_mm=_r(rng, 5.0, 18.0),
        lung_hu=_r(rng, -865.0, -825.0),
        lung_gradient_hu=_r(rng, 15.0, 45.0),
        heart_ctr=ctr,
        heart_ry_mm=_r(rng, 0.42, 0.52) * (body_ry - 30.0) * (1.0 + 0.6 * (ctr - 0.42)),
        heart_rz_mm=_r(rng, 0.21, 0.26) * lung_len,
        spine_radius_mm=_r(rng, 15.0, 19.0),
        vertebra_period_mm=_r(rng, 24.0, 28.0),
        aorta_radius_mm=_r(rng, 11.0, 15.0),
        vessel_threshold=_r(rng, 0.20, 0.25),
        noise_hu=_r(rng, 12.0, 22.0),
        field_seed=int(rng.integers(0, 2**31 - 1)),
    )
    return anatomy, extent


def _choose_types(rng: np.random.Generator, cfg: SyntheticConfig) -> list[str]:
    n = int(rng.choice(np.arange(1, len(cfg.n_findings_probs) + 1), p=np.asarray(cfg.n_findings_probs)))
    chosen: list[str] = []
    for _ in range(n):
        weights = dict(cfg.type_weights)
        for t in set(chosen):
            if t != NODULE or chosen.count(NODULE) >= cfg.max_nodules:
                weights.pop(t, None)
        names = sorted(weights)
        p = np.asarray([weights[k] for k in names], float)
        chosen.append(names[int(rng.choice(len(names), p=p / p.sum()))])
    return chosen


class _Placer:
    """Puts focal lesions inside one lobe, clear of fissures, pleural findings and each other."""

    def __init__(self, geo: Geometry, pleural: list[Finding]):
        self.geo = geo
        self.pleural = pleural
        self.taken: list[tuple[np.ndarray, float]] = []  # (centre, radius) of placed lesions

    def _points(self, c: np.ndarray, r: float) -> np.ndarray:
        offs = np.array([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)
        return c[None, :] + r * offs

    def ok(self, c: np.ndarray, r: float, lobe: str, margin_mm: float) -> bool:
        side = lobe_side(lobe)
        p = self._points(c, r + margin_mm)
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        g = self.geo
        if not g.in_lung(x, y, z, side).all():
            return False
        if not (g.lobe(y, z, side) == lobe).all():
            return False
        for f in self.pleural:
            sides = ("left", "right") if f.side == "bilateral" else (f.side,)
            if side not in sides:
                continue
            if f.type == PLEURAL_EFFUSION:
                # Keep a wide berth: fluid (~10 HU) would hide a solid lesion (~30 HU).
                if g.effusion_region(x, y + 6.0, z - 6.0, side, f.severity).any():
                    return False
            elif f.type == PNEUMOTHORAX and g.pneumothorax_region(x, y, z, side).any():
                return False
        return all(np.linalg.norm(c - tc) > r + tr + 8.0 for tc, tr in self.taken)

    def place(self, rng: np.random.Generator, lobe: str, r: float, margin_mm: float) -> np.ndarray | None:
        g = self.geo
        sx = g.side_sign(lobe_side(lobe))
        for _ in range(400):
            c = np.array(
                [
                    sx * (g.lung_lx + rng.uniform(-0.85, 0.85) * g.lung_ax),
                    g.lung_ly + rng.uniform(-0.85, 0.85) * g.lung_ay,
                    g.base_z + rng.uniform(0.05, 0.92) * g.lung_len,
                ]
            )
            if self.ok(c, r, lobe, margin_mm):
                self.taken.append((c, r))
                return c
        return None


def _lobe_order(rng: np.random.Generator, avoid: set[str]) -> list[str]:
    lobes = [lb for lb in LOBES if lb not in avoid] or list(LOBES)
    return [lobes[i] for i in rng.permutation(len(lobes))]


def sample_study(seed: int, config: SyntheticConfig | None = None) -> StudySpec:
    """One synthetic chest CT study, fully determined by `seed` (and `config`)."""
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng([int(seed), 0x5EED])
    normal = rng.random() < cfg.normal_fraction
    types = [] if normal else _choose_types(rng, cfg)
    anatomy, extent_mm = _sample_anatomy(rng, cardiomegaly=CARDIOMEGALY in types)
    geo = Geometry(anatomy)

    # Acquisition: the in-plane field of view must hold the body with a margin.
    pixel = max(_r(rng, *cfg.pixel_spacing_mm), (2.0 * anatomy.body_rx_mm + 30.0) / cfg.matrix)
    pixel = round(min(pixel, cfg.pixel_spacing_mm[1]), 4)
    slice_mm = float(rng.choice(np.asarray(cfg.slice_spacings_mm)))
    n_slices = round(extent_mm / slice_mm) + 1

    findings: list[Finding] = []
    # Diffuse and pleural findings first: focal lesions must then stay clear of them.
    if PLEURAL_EFFUSION in types:
        side = str(rng.choice(["left", "right", "bilateral"], p=[0.4, 0.4, 0.2]))
        severity = str(rng.choice(["small", "moderate", "large"], p=[0.35, 0.4, 0.25]))
        findings.append(Finding(PLEURAL_EFFUSION, side=side, severity=severity))
    if PNEUMOTHORAX in types:
        sides = ["left", "right"]
        eff = [f for f in findings if f.type == PLEURAL_EFFUSION]
        if eff and eff[0].side != "bilateral":
            sides.remove(eff[0].side)  # no hydropneumothorax in this phantom
        if not (eff and eff[0].side == "bilateral"):
            findings.append(Finding(PNEUMOTHORAX, side=str(rng.choice(sides))))
    if CARDIOMEGALY in types:
        findings.append(Finding(CARDIOMEGALY))
    if EMPHYSEMA in types:
        bullae = []
        for _ in range(int(rng.integers(4, 10))):
            side = str(rng.choice(["left", "right"]))
            for _try in range(50):
                c = np.array(
                    [
                        geo.side_sign(side) * (geo.lung_lx + rng.uniform(-0.7, 0.7) * geo.lung_ax),
                        geo.lung_ly + rng.uniform(-0.7, 0.7) * geo.lung_ay,
                        geo.base_z + rng.uniform(0.5, 0.9) * geo.lung_len,
                    ]
                )
                if geo.in_lung(c[0], c[1], c[2], side):
                    bullae.append({"center_mm": [round(float(v), 2) for v in c], "radius_mm": _r(rng, 4.0, 11.0)})
                    break
        findings.append(Finding(EMPHYSEMA, geometry={"lung_hu": _r(rng, -950.0, -925.0), "bullae": bullae}))

    placer = _Placer(geo, [f for f in findings if f.type in (PLEURAL_EFFUSION, PNEUMOTHORAX)])
    used_lobes: set[str] = set()
    for t in (
        [t for t in types if t == CONSOLIDATION] + [t for t in types if t == MASS] + [t for t in types if t == NODULE]
    ):
        placed = None
        if t == CONSOLIDATION:
            radius = _r(rng, 22.0, 38.0)
            for lobe in _lobe_order(rng, used_lobes):
                # The region is clipped to its lobe, so only its centre needs room.
                c = placer.place(rng, lobe, 12.0, 4.0)
                if c is not None:
                    placed = Finding(CONSOLIDATION, lobe=lobe, geometry={"center_mm": c, "radius_mm": radius})
                    break
        elif t == MASS:
            size = int(rng.integers(cfg.mass_size_mm[0], cfg.mass_size_mm[1] + 1))
            for lobe in _lobe_order(rng, used_lobes):
                c = placer.place(rng, lobe, 0.5 * size * 0.7, 3.0)
                if c is not None:
                    placed = Finding(MASS, lobe=lobe, size_mm=size, geometry={"center_mm": c})
                    break
        else:
            ground_glass = rng.random() < cfg.ground_glass_fraction
            lo = cfg.ground_glass_min_mm if ground_glass else cfg.nodule_size_mm[0]
            # Small nodules are commoner than large ones.
            size = round(lo + (cfg.nodule_size_mm[1] - lo) * rng.random() ** 1.6)
            avoid = {f.lobe for f in findings if f.type in (CONSOLIDATION, MASS)}
            for lobe in _lobe_order(rng, avoid):
                c = placer.place(rng, lobe, 0.5 * size, 4.0)
                if c is not None:
                    placed = Finding(
                        NODULE,
                        lobe=lobe,
                        size_mm=size,
                        density="ground-glass" if ground_glass else "solid",
                        geometry={"center_mm": c},
                    )
                    break
        if placed is not None:
            placed.geometry["center_mm"] = [round(float(v), 2) for v in placed.geometry["center_mm"]]
            if placed.type in (CONSOLIDATION, MASS):
                used_lobes.add(placed.lobe)
            findings.append(placed)

    if MASS in {f.type for f in findings}:
        # A mass draws with lobulated axes; keep its reported size the longest diameter.
        for f in findings:
            if f.type == MASS:
                half = 0.5 * f.size_mm
                f.geometry["radii_mm"] = [
                    half,
                    round(half * _r(rng, 0.75, 1.0), 2),
                    round(half * _r(rng, 0.75, 1.0), 2),
                ]
    for f in findings:
        if f.type == NODULE and f.density == "ground-glass":
            f.geometry["hu"] = _r(rng, -560.0, -450.0)

    return StudySpec(
        study_id=study_id_for(seed),
        seed=int(seed),
        anatomy=anatomy,
        findings=findings,
        slice_spacing_mm=slice_mm,
        pixel_spacing_mm=pixel,
        n_slices=n_slices,
        rows=cfg.matrix,
        cols=cfg.matrix,
    )
