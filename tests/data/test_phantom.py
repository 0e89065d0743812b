from __future__ import annotations

import copy

import numpy as np

from edgevlm.data import Finding, render_volume, sample_study
from edgevlm.data.anatomy import Geometry

DEMO = ((32, 128, 128), (10.0, 2.8, 2.8))


def _hu_at(spec, x, y, z, noise=False):
    """HU at one LPS point, from a 1-voxel render (the phantom is continuous in mm)."""
    return float(render_volume(spec, (1, 1, 1), (1.0, 1.0, 1.0), origin_mm=(x, y, z), noise=noise)[0, 0, 0])


def test_organ_values_are_realistic(normal_spec):
    g = Geometry(normal_spec.anatomy)
    a = normal_spec.anatomy
    z_mid = g.base_z + 0.6 * g.lung_len
    lung = _hu_at(normal_spec, -g.lung_lx, g.lung_ly - 0.4 * g.lung_ay, z_mid)
    assert -1000 <= lung <= -700
    hx, hy, hz = g.heart_c
    assert 20 <= _hu_at(normal_spec, hx, hy, hz) <= 60  # blood / myocardium
    # Vertebral body midway between two discs (discs sit at multiples of the period).
    assert 150 <= _hu_at(normal_spec, 0.0, g.spine_y, 0.5 * a.vertebra_period_mm) <= 1000
    assert _hu_at(normal_spec, 0.0, -a.body_ry_mm - 20.0, 0.0) == -1000.0  # air in front of the patient
    fat = _hu_at(normal_spec, 0.0, -a.body_ry_mm + 0.5 * a.fat_mm, 0.0)
    assert -130 <= fat <= -70
    trachea = _hu_at(normal_spec, 0.0, g.trachea_y, g.apex_z)
    assert trachea <= -900


def test_lung_mean_and_noise_at_demo_grid(normal_spec):
    v = render_volume(normal_spec, *DEMO)
    assert v.dtype == np.float32 and v.shape == DEMO[0]
    assert v.min() >= -1024 and v.max() <= 3071
    g = Geometry(normal_spec.anatomy)
    # Noise at the demo grid: native std scaled by sqrt(native voxel / demo voxel).
    clean = render_volume(normal_spec, *DEMO, noise=False)
    native = normal_spec.slice_spacing_mm * normal_spec.pixel_spacing_mm**2
    expected = normal_spec.anatomy.noise_hu * np.sqrt(native / (10.0 * 2.8 * 2.8))
    assert abs(float((v - clean)[clean > -990].std()) - expected) < 0.15 * expected + 0.05
    assert g.lung_len > 200


def test_deterministic_and_seeds_differ():
    a = render_volume(sample_study(11), *DEMO)
    b = render_volume(sample_study(11), *DEMO)
    c = render_volume(sample_study(12), *DEMO)
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 20.0


def _with(spec, findings):
    s = copy.deepcopy(spec)
    s.findings = findings
    return s


def _lung_side_mask(spec, side):
    d, h, w = DEMO[0]
    sz, sy, sx = DEMO[1]
    from edgevlm.data import default_origin_mm

    ox, oy, oz = default_origin_mm(DEMO[0], DEMO[1])
    z = oz + np.arange(d) * sz
    y = oy + np.arange(h) * sy
    x = ox + np.arange(w) * sx
    g = Geometry(spec.anatomy)
    return g.in_lung(x[None, None, :], y[None, :, None], z[:, None, None], side), (x, y, z)


def test_effusion_raises_dependent_hu_on_its_side(normal_spec):
    base = render_volume(normal_spec, *DEMO, noise=False)
    eff = render_volume(
        _with(normal_spec, [Finding("pleural_effusion", side="left", severity="moderate")]), *DEMO, noise=False
    )
    g = Geometry(normal_spec.anatomy)
    for side, should_change in (("left", True), ("right", False)):
        mask, (_, y, z) = _lung_side_mask(normal_spec, side)
        dependent = (
            mask & (y[None, :, None] > g.lung_ly + 0.5 * g.lung_ay) & (z[:, None, None] < g.base_z + 0.3 * g.lung_len)
        )
        delta = float(eff[dependent].mean() - base[dependent].mean())
        assert (delta > 300.0) if should_change else (abs(delta) < 1e-3)
    # Anterior lung is untouched.
    mask, (_, y, _) = _lung_side_mask(normal_spec, "left")
    anterior = mask & (y[None, :, None] < g.lung_ly - 0.3 * g.lung_ay)
    assert abs(float(eff[anterior].mean() - base[anterior].mean())) < 5.0


def test_pneumothorax_is_air_without_markings_at_the_lateral_rim(normal_spec):
    ptx = render_volume(_with(normal_spec, [Finding("pneumothorax", side="right")]), *DEMO, noise=False)
    base = render_volume(normal_spec, *DEMO, noise=False)
    g = Geometry(normal_spec.anatomy)
    mask, (x, y, z) = _lung_side_mask(normal_spec, "right")
    rim = mask & g.pneumothorax_region(x[None, None, :], y[None, :, None], z[:, None, None], "right")
    assert rim.sum() > 50
    # Mostly pure air (edge voxels blend with wall and lung), where the lung had vessels and texture.
    assert float(np.median(ptx[rim])) < -990.0
    assert float((ptx[rim] < -990.0).mean()) > 0.6
    assert float((base[rim] < -990.0).mean()) < 0.05
    left, _ = _lung_side_mask(normal_spec, "left")
    assert np.array_equal(ptx[left], base[left])


def test_focal_findings_change_the_image_where_they_are():
    # Take sampled studies that have each focal finding and compare with the same study without it.
    wanted = {"nodule": None, "mass": None, "consolidation": None}
    for seed in range(200):
        spec = sample_study(seed)
        for f in spec.findings:
            if f.type in wanted and wanted[f.type] is None:
                wanted[f.type] = (spec, f)
        if all(wanted.values()):
            break
    for ftype, (spec, f) in wanted.items():
        with_f = render_volume(spec, *DEMO, noise=False)
        without = render_volume(_with(spec, [g for g in spec.findings if g is not f]), *DEMO, noise=False)
        from edgevlm.data import default_origin_mm

        ox, oy, oz = default_origin_mm(*DEMO)
        cx, cy, cz = f.geometry["center_mm"]
        k, j, i = round((cz - oz) / 10.0), round((cy - oy) / 2.8), round((cx - ox) / 2.8)
        delta = with_f[k, j, i] - without[k, j, i]
        assert delta > 150.0, (ftype, delta)
        far = with_f[:, :, :10] - without[:, :, :10]  # the patient's far right edge (outside the body)
        assert np.abs(far).max() == 0.0


def test_ground_glass_is_fainter_than_solid(normal_spec):
    g = Geometry(normal_spec.anatomy)
    c = [-g.lung_lx, g.lung_ly - 0.3 * g.lung_ay, g.base_z + 0.7 * g.lung_len]
    solid = _with(normal_spec, [Finding("nodule", lobe="RUL", size_mm=14, density="solid", geometry={"center_mm": c})])
    gg = _with(
        normal_spec,
        [Finding("nodule", lobe="RUL", size_mm=14, density="ground-glass", geometry={"center_mm": c, "hu": -500.0})],
    )
    assert 0 <= _hu_at(solid, *c) <= 60
    assert -600 <= _hu_at(gg, *c) <= -400


def test_cardiomegaly_ratio():
    for seed in range(300):
        spec = sample_study(seed)
        if any(f.type == "cardiomegaly" for f in spec.findings):
            break
    g = Geometry(spec.anatomy)
    hz = g.heart_c[2]
    sl = render_volume(spec, (1, 512, 512), (1.0, 0.7, 0.7), origin_mm=(-179.0, -179.0, hz), noise=False)[0]
    y_row = round((g.heart_c[1] + 179.0) / 0.7)
    heart_cols = np.nonzero(np.abs(sl[y_row] - 40.0) < 15.0)[0]
    width_heart = (heart_cols.max() - heart_cols.min()) * 0.7
    assert width_heart / (2 * g.cav_rx) > 0.5


def test_emphysema_lowers_lung_hu(normal_spec):
    for seed in range(300):
        spec = sample_study(seed)
        emph = [f for f in spec.findings if f.type == "emphysema"]
        if emph:
            break
    mask, _ = _lung_side_mask(spec, "left")
    with_e = render_volume(spec, *DEMO, noise=False)
    without = render_volume(_with(spec, [f for f in spec.findings if f.type != "emphysema"]), *DEMO, noise=False)
    assert float(with_e[mask].mean()) < float(without[mask].mean()) - 40.0
