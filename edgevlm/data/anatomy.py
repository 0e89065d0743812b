"""Chest anatomy of the procedural phantom, in continuous millimetres.

Coordinates are DICOM patient LPS with the patient centred at the origin: +x is the patient's left,
+y posterior, +z superior. Every region function takes arrays that broadcast against each other (a
whole grid as (D,1,1)/(1,H,1)/(1,1,W), or a handful of points), so the generator can test where a
lesion may go with exactly the geometry the renderer draws.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Anatomy:
    body_rx_mm: float  # half-width of the body, left-right
    body_ry_mm: float  # half-depth of the body, anterior-posterior
    body_shape_p: float  # superellipse exponent: 2 = ellipse, larger = boxier
    fat_mm: float  # subcutaneous fat
    muscle_mm: float  # chest-wall muscle
    rib_mm: float  # radial thickness of the rib band
    rib_period_mm: float
    rib_width_mm: float  # cranio-caudal width of one rib
    rib_phase_mm: float
    mediastinum_halfwidth_mm: float
    lung_apex_z_mm: float
    lung_base_z_mm: float
    dome_height_mm: float  # diaphragm dome above the costophrenic level
    right_dome_extra_mm: float  # the liver pushes the right dome higher
    lung_hu: float  # parenchyma attenuation
    lung_gradient_hu: float  # extra density in the dependent (posterior) lung
    heart_ctr: float  # cardiothoracic ratio: heart width / inner thoracic width
    heart_ry_mm: float
    heart_rz_mm: float
    spine_radius_mm: float
    vertebra_period_mm: float
    aorta_radius_mm: float
    vessel_threshold: float  # tube radius in noise-field units (vessel calibre)
    noise_hu: float  # image noise std of one native voxel
    field_seed: int  # seed of the continuous texture fields

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Anatomy:
        return cls(**d)


class Geometry:
    """Derived positions and region tests for one `Anatomy` (all mm, LPS)."""

    def __init__(self, a: Anatomy):
        self.a = a
        wall = a.fat_mm + a.muscle_mm + a.rib_mm
        self.cav_rx = a.body_rx_mm - wall  # inner thoracic cavity
        self.cav_ry = a.body_ry_mm - wall
        mhw = a.mediastinum_halfwidth_mm
        self.lung_ax = (self.cav_rx - mhw) / 2.0 + 4.0  # a little overlap with the cavity clip
        self.lung_lx = mhw + self.lung_ax - 4.0  # |x| of each lung centre
        self.lung_ly = 0.06 * self.cav_ry
        self.lung_ay = 0.92 * self.cav_ry
        self.apex_z = a.lung_apex_z_mm
        self.base_z = a.lung_base_z_mm
        self.lung_len = self.apex_z - self.base_z
        # Heart: anterior, left of midline, lower third; width set by the cardiothoracic ratio.
        self.heart_c = (0.12 * self.cav_rx, -0.22 * self.cav_ry, self.base_z + 0.30 * self.lung_len)
        self.heart_r = (a.heart_ctr * self.cav_rx, a.heart_ry_mm, a.heart_rz_mm)
        self.spine_y = self.cav_ry - 1.1 * a.spine_radius_mm
        self.trachea_y = self.spine_y - a.spine_radius_mm - 14.0
        self.carina_z = self.apex_z - 0.42 * self.lung_len
        self.sternum_y = -(self.cav_ry + 0.5 * a.rib_mm)

    # -- lungs --------------------------------------------------------------------------------------
    def side_sign(self, side: str) -> float:
        return -1.0 if side == "right" else 1.0  # patient right is -x in LPS

    def lung_u(self, z):
        """0 at the lung base, 1 at the apex."""
        return (z - self.base_z) / self.lung_len

    def lung_v(self, y):
        """0 at the anterior edge of the lung, 1 at the posterior edge."""
        return (y - (self.lung_ly - self.lung_ay)) / (2.0 * self.lung_ay)

    def lung_q(self, x, y, z, side: str):
        """Normalised squared radius of one lung's envelope (< 1 inside), apex rounded off."""
        cx = self.side_sign(side) * self.lung_lx
        t = np.clip((self.lung_u(z) - 0.55) / 0.45, 0.0, None)
        return ((x - cx) / self.lung_ax) ** 2 + ((y - self.lung_ly) / self.lung_ay) ** 2 + t**2

    def diaphragm_z(self, x, y, side: str):
        cx = self.side_sign(side) * self.lung_lx
        dome = 1.0 - ((x - cx) / self.lung_ax) ** 2 - ((y - self.lung_ly) / self.lung_ay) ** 2
        extra = self.a.right_dome_extra_mm if side == "right" else 0.0
        return self.base_z + (self.a.dome_height_mm + extra) * np.clip(dome, 0.0, 1.0)

    def wall_depth(self, x, y):
        """Depth below the skin along the ray from the body axis (mm; negative outside the body)."""
        a = self.a
        p = a.body_shape_p
        rho = (np.abs(x / a.body_rx_mm) ** p + np.abs(y / a.body_ry_mm) ** p) ** (1.0 / p)
        r = np.maximum(np.sqrt(x * x + y * y), 1e-3)  # the axis itself is deep inside
        return r * (1.0 / np.maximum(rho, 1e-6) - 1.0)

    @property
    def wall_mm(self) -> float:
        return self.a.fat_mm + self.a.muscle_mm + self.a.rib_mm

    def heart_q(self, x, y, z):
        (hx, hy, hz), (rx, ry, rz) = self.heart_c, self.heart_r
        return ((x - hx) / rx) ** 2 + ((y - hy) / ry) ** 2 + ((z - hz) / rz) ** 2

    def in_lung(self, x, y, z, side: str):
        """Hard lung mask of one side (the renderer uses soft edges around the same surfaces)."""
        return (
            (self.lung_q(x, y, z, side) < 1.0)
            & (self.wall_depth(x, y) > self.wall_mm + 1.0)
            & (z > self.diaphragm_z(x, y, side))
            & (self.heart_q(x, y, z) > 1.15)
            & ((x > self.a.mediastinum_halfwidth_mm) if side == "left" else (x < -self.a.mediastinum_halfwidth_mm))
        )

    def lobe(self, y, z, side: str):
        """Lobe labels ('RUL', ...) at points of one side, from the oblique and horizontal fissures."""
        u, v = self.lung_u(np.asarray(z, float)), self.lung_v(np.asarray(y, float))
        lower = u < 0.08 + 0.62 * v  # oblique fissure: posterior-inferior is the lower lobe
        if side == "left":
            return np.where(lower, "LLL", "LUL")
        return np.where(lower, "RLL", np.where(u < 0.55, "RML", "RUL"))  # horizontal fissure

    # -- pleural findings ------------------------------------------------------------------------------
    def effusion_region(self, x, y, z, side: str, severity: str):
        """Dependent fluid: the posterior-basal part of the lung envelope, deeper at the base."""
        frac, top = {"small": (0.22, 0.40), "moderate": (0.38, 0.58), "large": (0.58, 0.80)}[severity]
        u = self.lung_u(z)
        depth = frac * 2.0 * self.lung_ay * np.sqrt(np.clip(1.0 - u / top, 0.0, 1.0))
        back = self.lung_ly + self.lung_ay
        return (y > back - depth) & (depth > 0)

    def pneumothorax_region(self, x, y, z, side: str):
        """Pleural air along the lateral wall and over the apex (rim of the lung envelope)."""
        cx = self.side_sign(side) * self.lung_lx
        lateral = np.clip(0.5 + 0.5 * self.side_sign(side) * (x - cx) / self.lung_ax, 0.0, 1.0)
        apical = np.clip((self.lung_u(z) - 0.45) / 0.55, 0.0, 1.0)
        rim = 0.30 * np.maximum(lateral, apical) ** 1.5
        return np.sqrt(self.lung_q(x, y, z, side)) > 1.0 - rim
