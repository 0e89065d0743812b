"""Render a `StudySpec` to HU on any grid.

The phantom is defined in continuous millimetres (see `anatomy.py`), so the same study renders at the
native DICOM grid (512x512, 0.6-0.8 mm, 1.25-5 mm slices) or straight at a model's grid. Two details
make a direct render at a coarse grid look like a resampled native series:

- Partial volume along z: nodules, masses and ribs are averaged over each slice's slab, so a 6 mm
  nodule still shows in a 10 mm slice (at reduced contrast) instead of vanishing between samples.
- Noise: white Gaussian noise whose std is the native voxel's std scaled by sqrt(native voxel volume /
  target voxel volume), i.e. what averaging native voxels down to the target voxel leaves.

Textures (lung vessels, parenchymal variation) come from smooth random fields defined on a fixed
millimetre lattice and evaluated separably with matrix products, which keeps a 32x128x128 render in
tens of milliseconds.
"""

from __future__ import annotations

import functools

import numpy as np

from edgevlm.data.anatomy import Geometry
from edgevlm.data.findings import (
    CONSOLIDATION,
    EMPHYSEMA,
    MASS,
    NODULE,
    PLEURAL_EFFUSION,
    PNEUMOTHORAX,
    lobe_side,
)
from edgevlm.data.spec import StudySpec, default_origin_mm

HU_AIR = -1000.0
HU_FAT = -100.0
HU_MUSCLE = 40.0
HU_BLOOD = 40.0
HU_MEDIASTINUM = -60.0  # fat with interspersed soft tissue
HU_LIVER = 55.0
HU_SPLEEN = 42.0
HU_CORTICAL = 750.0
HU_CANCELLOUS = 230.0
HU_RIB = 550.0
HU_STERNUM = 400.0
HU_DISC = 90.0
HU_CSF = 25.0
HU_FLUID = 12.0
HU_CONSOLIDATION = 35.0
HU_SOLID_NODULE = 35.0
HU_MASS = 38.0
HU_BULLA = -995.0

_LATTICE_MM = 8.0
_LATTICE_HALF_MM = 240.0
# Std of white lattice noise after quadratic B-spline interpolation (3 axes of ~0.55 each).
_FIELD_STD = 0.41
_FIELD_GRAD_PER_MM = 0.16  # typical gradient of the unit-variance field, for tube widths


def _bspline_matrix(coords_mm: np.ndarray) -> tuple[np.ndarray, int]:
    """Quadratic B-spline weights (n_coords, n_used_lattice) and the first lattice index used."""
    t = (coords_mm + _LATTICE_HALF_MM) / _LATTICE_MM
    n_lat = round(2 * _LATTICE_HALF_MM / _LATTICE_MM) + 1
    t = np.clip(t, 1.0, n_lat - 2.0)
    i = np.floor(t + 0.5).astype(np.int64)
    f = t - i
    lo, hi = int(i.min()) - 1, int(i.max()) + 1
    w = np.zeros((len(t), hi - lo + 1), np.float32)
    rows = np.arange(len(t))
    w[rows, i - 1 - lo] = 0.5 * (0.5 - f) ** 2
    w[rows, i - lo] = 0.75 - f * f
    w[rows, i + 1 - lo] = 0.5 * (0.5 + f) ** 2
    return w, lo


@functools.lru_cache(maxsize=8)
def _lattice(field_seed: int) -> np.ndarray:
    n = round(2 * _LATTICE_HALF_MM / _LATTICE_MM) + 1
    rng = np.random.default_rng([field_seed, 0xF1E1D])
    lat = rng.standard_normal((3, n, n, n), dtype=np.float32) / _FIELD_STD
    lat.setflags(write=False)
    return lat


def _fields(field_seed: int, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The three unit-variance random fields (vessel a, vessel b, texture) on the grid z*y*x."""
    lat = _lattice(field_seed)
    wz, z0 = _bspline_matrix(z)
    wy, y0 = _bspline_matrix(y)
    wx, x0 = _bspline_matrix(x)
    sub = lat[:, z0 : z0 + wz.shape[1], y0 : y0 + wy.shape[1], x0 : x0 + wx.shape[1]]
    t = sub @ wx.T  # (3, lz, ly, W)
    t = np.matmul(wy, t)  # (3, lz, H, W)
    lz = t.shape[1]
    t = np.matmul(wz, t.reshape(3, lz, -1))  # (3, D, H*W)
    return t.reshape(3, len(z), len(y), len(x))


def _soft(sd_mm, w_mm: float):
    """Inside-fraction from a signed distance (negative inside) with an edge of width w_mm."""
    return np.clip(0.5 - sd_mm / w_mm, 0.0, 1.0)


def _slab_overlap(z: np.ndarray, dz: float, lo, hi):
    """Fraction of each slab [z - dz/2, z + dz/2] covered by [lo, hi] (a point test for tiny dz)."""
    if dz < 1e-3:
        return ((z >= lo) & (z <= hi)).astype(np.float32)
    a = np.maximum(z - dz / 2.0, lo)
    b = np.minimum(z + dz / 2.0, hi)
    return np.clip((b - a) / dz, 0.0, 1.0)


def _lerp_(hu: np.ndarray, frac, value) -> None:
    """In place: hu += frac * (value - hu)."""
    hu += frac * (value - hu)


def _box(coords: np.ndarray, lo: float, hi: float) -> slice:
    idx = np.nonzero((coords >= lo) & (coords <= hi))[0]
    if len(idx) == 0:
        return slice(0, 0)
    return slice(int(idx[0]), int(idx[-1]) + 1)


def _segment_dist(px, py, pz, a, b):
    """Distance from points to the segment a-b (all mm)."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    ab = b - a
    t = ((px - a[0]) * ab[0] + (py - a[1]) * ab[1] + (pz - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt((px - a[0] - t * ab[0]) ** 2 + (py - a[1] - t * ab[1]) ** 2 + (pz - a[2] - t * ab[2]) ** 2)


def render_volume(
    spec: StudySpec,
    shape_zyx: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    origin_mm: tuple[float, float, float] | None = None,
    noise: bool = True,
) -> np.ndarray:
    """HU (float32, (D, H, W) = (z, y, x)) of the study on an axial grid with identity direction.

    `spacing_mm` is (z, y, x); `origin_mm` is the LPS (x, y, z) of voxel [0, 0, 0], by default the
    grid centred on the patient (`default_origin_mm`). Deterministic for (spec, grid, noise).
    """
    d, h, w = (int(v) for v in shape_zyx)
    sz, sy, sx = (float(v) for v in spacing_mm)
    if origin_mm is None:
        origin_mm = default_origin_mm((d, h, w), (sz, sy, sx))
    ox, oy, oz = (float(v) for v in origin_mm)
    x = (ox + np.arange(w) * sx).astype(np.float32)
    y = (oy + np.arange(h) * sy).astype(np.float32)
    z = (oz + np.arange(d) * sz).astype(np.float32)
    geo = Geometry(spec.anatomy)
    a = spec.anatomy
    edge = max(0.5 * max(sx, sy), 0.3)  # in-plane partial-volume edge width
    by_type = {}
    for f in spec.findings:
        by_type.setdefault(f.type, []).append(f)

    X2, Y2 = x[None, :], y[:, None]
    depth = geo.wall_depth(X2, Y2).astype(np.float32)  # (H, W)
    hu = np.full((d, h, w), HU_AIR, np.float32)

    # Body wall: fat, muscle, rib band, cavity (all z-invariant cross-sections).
    wall = geo.wall_mm
    cross = np.full((h, w), HU_AIR, np.float32)
    _lerp_(cross, _soft(-depth, edge), HU_FAT)
    _lerp_(cross, _soft(a.fat_mm - depth, edge), HU_MUSCLE)
    _lerp_(cross, _soft(wall - depth, edge), HU_MEDIASTINUM)
    hu[:] = cross

    # Ribs: a band inside the muscle, interrupted periodically along z, sloping down anteriorly.
    band = (depth > a.fat_mm + a.muscle_mm) & (depth < wall) & ~((np.abs(X2) < 28.0) & (Y2 < 0))
    by, bx = np.nonzero(band)
    if len(by):
        zz = z[:, None] - 0.35 * y[by][None, :] + a.rib_phase_mm
        centre = np.round(zz / a.rib_period_mm) * a.rib_period_mm
        zrel = zz - centre
        frac = _slab_overlap(zrel, sz, -a.rib_width_mm / 2.0, a.rib_width_mm / 2.0)
        sub = hu[:, by, bx]
        _lerp_(sub, frac, HU_RIB)
        hu[:, by, bx] = sub

    # Abdomen below the diaphragm domes (liver on the right).
    zs = _box(z, -1e9, geo.base_z + a.dome_height_mm + a.right_dome_extra_mm + 5.0)
    if zs.stop > zs.start:
        zb = z[zs][:, None, None]
        dia = np.where(X2 < 0, geo.diaphragm_z(X2, Y2, "right"), geo.diaphragm_z(X2, Y2, "left"))
        organ = np.where(X2 < 10.0, HU_LIVER, HU_SPLEEN).astype(np.float32)
        frac = _soft(zb - dia[None], edge) * _soft(wall - depth, edge)[None]
        blk = hu[zs]
        _lerp_(blk, frac, organ[None])
        hu[zs] = blk

    _draw_mediastinum(hu, geo, x, y, z, sz, edge)

    # Texture fields over the lung box only (the expensive part).
    lung_y = _box(y, geo.lung_ly - geo.lung_ay - 2, geo.lung_ly + geo.lung_ay + 2)
    lung_z = _box(z, geo.base_z - 1, geo.apex_z + 1)
    lung_x = _box(x, -(geo.lung_lx + geo.lung_ax) - 2, geo.lung_lx + geo.lung_ax + 2)
    if lung_y.stop > lung_y.start and lung_z.stop > lung_z.start and lung_x.stop > lung_x.start:
        _draw_lungs(hu, spec, geo, by_type, x, y, z, (lung_z, lung_y, lung_x), (sz, sy, sx), edge)

    # Airways over the lungs' medial parts.
    _draw_airways(hu, geo, x, y, z, edge)

    for f in by_type.get(MASS, []) + by_type.get(NODULE, []):
        _draw_ellipsoid_lesion(hu, f, x, y, z, sz)

    if noise:
        native_vox = spec.slice_spacing_mm * spec.pixel_spacing_mm**2
        std = a.noise_hu * np.sqrt(native_vox / (sz * sy * sx))
        key = [spec.seed, d, h, w, *(round(v * 1000) for v in (sz, sy, sx, ox, oy, oz))]
        key = [k % (2**63) for k in key]  # numpy seeds must be non-negative
        rng = np.random.default_rng(key)
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(std)
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return hu


def _draw_mediastinum(hu, geo: Geometry, x, y, z, sz: float, edge: float) -> None:
    a = geo.a
    X2, Y2 = x[None, :], y[:, None]
    # Spine: vertebral body (cortical rim, cancellous core, discs), canal, arch, spinous process.
    rs = a.spine_radius_mm
    rb = np.sqrt(X2**2 + (Y2 - geo.spine_y) ** 2)
    canal_y = geo.spine_y + rs + 9.0
    rc = np.sqrt(X2**2 + (Y2 - canal_y) ** 2)
    spine = np.zeros_like(rb)
    spine_hu = np.zeros_like(rb)
    body = _soft(rb - rs, edge)
    spine += body
    spine_hu += body * np.where(rb > rs - 2.5, HU_CORTICAL, HU_CANCELLOUS)
    arch = _soft(rc - 12.5, edge) * (1 - body)
    process = (
        _soft(np.abs(X2) - 5.0, edge)
        * (canal_y < Y2)
        * (geo.wall_depth(X2, Y2) > a.fat_mm + 3.0)
        * (1 - arch)
        * (1 - body)
    )
    canal = _soft(rc - 7.5, edge)
    spine += arch + process
    spine_hu += (arch * (1 - canal)) * 450.0 + arch * canal * HU_CSF + process * 450.0
    ys = _box(y, geo.spine_y - rs - 2, geo.a.body_ry_mm)
    xs = _box(x, -rs - 2, rs + 2)
    if ys.stop > ys.start and xs.stop > xs.start:
        frac = spine[ys, xs]
        val = np.where(frac > 0, spine_hu[ys, xs] / np.maximum(frac, 1e-6), 0.0).astype(np.float32)
        blk = hu[:, ys, xs]
        _lerp_(blk, frac[None], val[None])
        # Intervertebral discs replace the vertebral body periodically along z.
        zrel = z - np.round(z / a.vertebra_period_mm) * a.vertebra_period_mm
        disc = _slab_overlap(zrel, sz, -3.0, 3.0)[:, None, None] * body[ys, xs][None]
        _lerp_(blk, disc, HU_DISC)
        hu[:, ys, xs] = blk

    # Sternum in front of the heart.
    zs = _box(z, geo.heart_c[2] - 30.0, geo.apex_z - 20.0)
    st = _soft(np.sqrt((X2 / 16.0) ** 2 + ((Y2 - geo.sternum_y) / 6.0) ** 2) * 6.0 - 6.0, edge)
    ys, xs = _box(y, geo.sternum_y - 8, geo.sternum_y + 8), _box(x, -18, 18)
    if zs.stop > zs.start and ys.stop > ys.start:
        blk = hu[zs, ys, xs]
        _lerp_(blk, st[ys, xs][None], HU_STERNUM)
        hu[zs, ys, xs] = blk

    # Heart with a rim of pericardial fat.
    (hx, hy, hz), (rx, ry, rz) = geo.heart_c, geo.heart_r
    zs, ys, xs = _box(z, hz - rz - 5, hz + rz + 5), _box(y, hy - ry - 5, hy + ry + 5), _box(x, hx - rx - 5, hx + rx + 5)
    if zs.stop > zs.start and ys.stop > ys.start and xs.stop > xs.start:
        q = np.sqrt(geo.heart_q(x[xs][None, None, :], y[ys][None, :, None], z[zs][:, None, None]))
        rmin = min(rx, ry, rz)
        blk = hu[zs, ys, xs]
        _lerp_(blk, _soft((q - 1.0) * rmin - 4.0, edge), HU_FAT)
        _lerp_(blk, _soft((q - 1.0) * rmin, edge), HU_BLOOD)
        hu[zs, ys, xs] = blk

    # Aorta: ascending, arch, descending.
    ra = a.aorta_radius_mm
    asc = (-0.10 * geo.cav_rx, -0.15 * geo.cav_ry)
    desc = (rs + 0.6 * ra, geo.spine_y - 0.6 * rs)
    arch_z = geo.apex_z - 0.30 * geo.lung_len
    _tube(hu, x, y, z, (asc[0], asc[1], hz), (asc[0], asc[1], arch_z), ra, HU_BLOOD, edge)
    _tube(hu, x, y, z, (asc[0], asc[1], arch_z), (desc[0], desc[1], arch_z), ra, HU_BLOOD, edge)
    _tube(hu, x, y, z, (desc[0], desc[1], arch_z), (desc[0], desc[1], geo.base_z - 30.0), ra, HU_BLOOD, edge)


def _tube(hu, x, y, z, p0, p1, radius, value, edge, wall_mm: float = 0.0, wall_value=None) -> None:
    lo = np.minimum(p0, p1) - radius - wall_mm - 2
    hi = np.maximum(p0, p1) + radius + wall_mm + 2
    zs, ys, xs = _box(z, lo[2], hi[2]), _box(y, lo[1], hi[1]), _box(x, lo[0], hi[0])
    if zs.stop <= zs.start or ys.stop <= ys.start or xs.stop <= xs.start:
        return
    dist = _segment_dist(x[xs][None, None, :], y[ys][None, :, None], z[zs][:, None, None], p0, p1)
    blk = hu[zs, ys, xs]
    if wall_mm > 0:
        _lerp_(blk, _soft(dist - radius - wall_mm, edge), wall_value)
    _lerp_(blk, _soft(dist - radius, edge), value)
    hu[zs, ys, xs] = blk


def _draw_airways(hu, geo: Geometry, x, y, z, edge: float) -> None:
    top = geo.apex_z + 40.0
    c = geo.carina_z
    ty = geo.trachea_y
    _tube(hu, x, y, z, (0.0, ty, top), (0.0, ty, c), 9.0, HU_AIR, edge, wall_mm=2.0, wall_value=HU_MUSCLE)
    for s in (-1.0, 1.0):
        end = (s * (geo.a.mediastinum_halfwidth_mm + 12.0), geo.lung_ly - 0.1 * geo.lung_ay, c - 25.0)
        _tube(hu, x, y, z, (0.0, ty, c), end, 6.0, HU_AIR, edge, wall_mm=1.5, wall_value=HU_MUSCLE)


def _draw_lungs(hu, spec: StudySpec, geo: Geometry, by_type, x, y, z, box, spacing, edge) -> None:
    a = geo.a
    zs, ys, xs = box
    sz, sy, sx = spacing
    X, Y, Z = x[xs][None, None, :], y[ys][None, :, None], z[zs][:, None, None]
    fields = _fields(a.field_seed, z[zs], y[ys], x[xs])
    blk = hu[zs, ys, xs]

    emph = by_type.get(EMPHYSEMA, [])
    lung_hu = emph[0].geometry.get("lung_hu", -935.0) if emph else a.lung_hu
    vessel_thr = a.vessel_threshold * (0.75 if emph else 1.0)
    # Vessels: tubes along the curves where two random fields both vanish; calibre grows toward the
    # hila. Thick slabs average thin vessels down, so their contrast falls with slice thickness.
    d = np.sqrt(fields[0] ** 2 + fields[1] ** 2)
    field_edge = _FIELD_GRAD_PER_MM * edge
    # Thin tubes fill only part of a large voxel: about sqrt(3 mm / slice) through the slab and
    # 2 mm / pixel in plane. This keeps vessels fainter than a 6 mm nodule at the demo grid, as in a
    # resampled native series.
    vessel_gain = min(1.0, np.sqrt(3.0 / max(sz, 1e-3))) * min(1.0, 2.0 / max(0.5 * (sy + sx), 1e-3))
    ptx_sides = {f.side for f in by_type.get(PNEUMOTHORAX, [])}

    for side in ("right", "left"):
        s = geo.side_sign(side)
        hilum = (s * (a.mediastinum_halfwidth_mm + 15.0), geo.lung_ly - 0.1 * geo.lung_ay, geo.carina_z - 25.0)
        r_h = np.sqrt((X - hilum[0]) ** 2 + (Y - hilum[1]) ** 2 + ((Z - hilum[2]) * 0.8) ** 2)
        thr = vessel_thr * (1.0 + 1.5 * np.exp(-r_h / 45.0))
        vessels = np.clip((thr - d) / field_edge + 0.5, 0.0, 1.0) * vessel_gain

        # Lung mask: intersection of envelope, cavity, diaphragm, heart and mediastinum boundaries.
        q = geo.lung_q(X, Y, Z, side)
        rq = np.sqrt(q)
        sd = (rq - 1.0) * min(geo.lung_ax, geo.lung_ay)
        sd = np.maximum(sd, (geo.wall_mm + 1.0 - geo.wall_depth(X, Y)))
        sd = np.maximum(sd, geo.diaphragm_z(X, Y, side) - Z)
        hq = np.sqrt(geo.heart_q(X, Y, Z))
        sd = np.maximum(sd, (np.sqrt(1.15) - hq) * min(geo.heart_r))
        sd = np.maximum(sd, a.mediastinum_halfwidth_mm - s * X)
        m = _soft(sd, edge)
        if not m.any():
            continue

        paren = lung_hu + a.lung_gradient_hu * (Y - geo.lung_ly) / geo.lung_ay * 0.5 + 12.0 * fields[2]
        if side in ptx_sides:
            paren = paren + 50.0  # the partly collapsed lung is denser
        val = paren + vessels * (HU_BLOOD - paren)
        if emph:
            for b in emph[0].geometry.get("bullae", []):
                (cx, cy, cz), rb = b["center_mm"], b["radius_mm"]
                if (cx < 0) != (side == "right"):
                    continue
                rr = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2 + (Z - cz) ** 2)
                val = val + _soft(rr - rb, edge) * (HU_BULLA - val)

        for f in by_type.get(PLEURAL_EFFUSION, []):
            if f.side in (side, "bilateral"):
                frac, top = {"small": (0.22, 0.40), "moderate": (0.38, 0.58), "large": (0.58, 0.80)}[f.severity]
                u = geo.lung_u(Z)
                depth = frac * 2.0 * geo.lung_ay * np.sqrt(np.clip(1.0 - u / top, 0.0, 1.0))
                level = geo.lung_ly + geo.lung_ay - depth
                fluid = _soft(level - Y, edge) * (depth > 0)
                val = val + fluid * (HU_FLUID - val)
        for f in by_type.get(PNEUMOTHORAX, []):
            if f.side == side:
                cx = s * geo.lung_lx
                lateral = np.clip(0.5 + 0.5 * s * (X - cx) / geo.lung_ax, 0.0, 1.0)
                apical = np.clip((geo.lung_u(Z) - 0.45) / 0.55, 0.0, 1.0)
                rim = 0.30 * np.maximum(lateral, apical) ** 1.5
                air = _soft(((1.0 - rim) - rq) * min(geo.lung_ax, geo.lung_ay), edge)
                val = val + air * (HU_AIR - val)
        for f in by_type.get(CONSOLIDATION, []):
            if lobe_side(f.lobe) == side:
                cx, cy, cz = f.geometry["center_mm"]
                rc = f.geometry["radius_mm"]
                # Irregular outline: the texture field wobbles the radius by about +-15%.
                rr = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2 + (Z - cz) ** 2) - 0.15 * rc * fields[2]
                in_lobe = geo.lobe(Y + 0 * X, Z + 0 * X, side) == f.lobe
                cons = _soft(rr - rc, edge) * in_lobe
                # Air bronchograms: the airway tubes stay aerated inside the consolidation.
                bronchi = np.clip((0.8 * thr - d) / field_edge + 0.5, 0.0, 1.0)
                target = HU_CONSOLIDATION + bronchi * (-850.0 - HU_CONSOLIDATION)
                val = val + cons * (target - val)

        _lerp_(blk, m, val)
    hu[zs, ys, xs] = blk


def _draw_ellipsoid_lesion(hu, f, x, y, z, sz: float) -> None:
    """Nodule or mass with slab partial volume along z (the chord through each slab)."""
    cx, cy, cz = f.geometry["center_mm"]
    if f.type == MASS:
        rx, ry, rz = f.geometry.get("radii_mm", [f.size_mm / 2.0] * 3)
        value = HU_MASS
    else:
        rx = ry = rz = f.size_mm / 2.0
        value = f.geometry.get("hu", -500.0) if f.density == "ground-glass" else HU_SOLID_NODULE
    zs = _box(z, cz - rz - sz, cz + rz + sz)
    ys, xs = _box(y, cy - ry - 1, cy + ry + 1), _box(x, cx - rx - 1, cx + rx + 1)
    if zs.stop <= zs.start or ys.stop <= ys.start or xs.stop <= xs.start:
        return
    X, Y = x[xs][None, :], y[ys][:, None]
    half = rz * np.sqrt(np.clip(1.0 - ((X - cx) / rx) ** 2 - ((Y - cy) / ry) ** 2, 0.0, None))  # (h, w)
    Z = z[zs][:, None, None]
    frac = _slab_overlap(Z, sz, cz - half[None], cz + half[None])
    blk = hu[zs, ys, xs]
    _lerp_(blk, frac, value)
    hu[zs, ys, xs] = blk
