"""Recipes: JSON round trip, validation, shapes and ranges, orientation, and resampling accuracy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edgevlm.errors import EdgeVLMError
from edgevlm.preprocess import RECIPES, Recipe, box_average_shape, box_mean, preprocess, resize
from edgevlm.volume import Volume


def phantom(shape=(60, 96, 96), spacing=(2.5, 0.8, 0.8)) -> Volume:
    """Air (-1000) around a soft-tissue ellipsoid (40 HU) holding a bone block (700 HU)."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    a = np.full(shape, -1000.0, np.float32)
    a[(z / 0.8) ** 2 + (y / 0.7) ** 2 + (x / 0.9) ** 2 < 1] = 40.0
    a[(abs(z) < 0.2) & (abs(y - 0.3) < 0.1) & (abs(x) < 0.2)] = 700.0
    a += np.random.default_rng(0).normal(0, 5, shape).astype(np.float32)
    return Volume(a, spacing)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_json_round_trip(name):
    r = RECIPES[name]
    again = Recipe.from_json(r.to_json())
    assert again == r and again.to_dict() == r.to_dict()


def test_recipe_rejects_unknown_keys_and_bad_values():
    d = RECIPES["demo-chest"].to_dict()
    with pytest.raises(EdgeVLMError, match="unknown keys"):
        Recipe.from_dict({**d, "windw": [0, 1]})
    for bad in ({"window": [600, -1000]}, {"grid": [32, 0, 128]}, {"orientation": "LLS"},
                {"intensity": "zscore"}, {"spacing_mm": [1, -1, 1]}, {"fit": "stretch"}):
        with pytest.raises(EdgeVLMError):
            Recipe.from_dict({**d, **bad})
    with pytest.raises(EdgeVLMError, match="not valid JSON"):
        Recipe.from_json("{")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_presets_shape_and_range(name):
    r = RECIPES[name]
    out = preprocess(phantom(), name)
    assert out.shape == r.grid and out.dtype == np.float32
    assert out.min() >= r.out_range[0] - 1e-6 and out.max() <= r.out_range[1] + 1e-6


def test_demo_chest_window_and_pad_value():
    out = preprocess(phantom(), "demo-chest")
    # 60 slices x 2.5 mm = 150 mm -> 15 slices at 10 mm, centred in 32: padding slices are 0 (air).
    assert np.all(out[:8] == 0.0) and np.all(out[-9:] == 0.0)
    mid = out[16]
    assert mid.max() == pytest.approx(1.0, abs=0.05)  # bone (700 HU) clips at the window top (600)
    assert np.median(mid[mid > 0.1]) == pytest.approx((40 + 1000) / 1600, abs=0.05)


def test_input_volume_is_not_modified():
    v = phantom()
    before = v.array.copy()
    for name in RECIPES:
        preprocess(v, name)
    np.testing.assert_array_equal(v.array, before)


@pytest.mark.parametrize("name", ["demo-chest", "m3d-lamed"])
def test_flipped_and_permuted_volumes_give_the_same_array(name):
    v = phantom()
    flipped = Volume(np.ascontiguousarray(v.array[::-1, :, ::-1]), v.spacing_mm, direction=np.diag([-1.0, 1, -1]))
    # x and y voxel axes swapped: column axis now runs posterior, row axis left.
    swapped = Volume(np.ascontiguousarray(v.array.transpose(0, 2, 1)), (2.5, 0.8, 0.8),
                     direction=[[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    ref = preprocess(v, name)
    np.testing.assert_array_equal(preprocess(flipped, name), ref)
    np.testing.assert_array_equal(preprocess(swapped, name), ref)


def test_orientation_none_keeps_stored_axes():
    v = phantom()
    flipped_array = np.ascontiguousarray(v.array[::-1])
    r = dataclasses.replace(RECIPES["demo-chest"], orientation=None)
    as_stored = preprocess(Volume(flipped_array, v.spacing_mm, direction=np.diag([1.0, 1, -1])), r)
    np.testing.assert_array_equal(as_stored, preprocess(Volume(flipped_array, v.spacing_mm), r))
    assert not np.array_equal(as_stored, preprocess(v, r))


def ramp_volume(n_z=40, spacing_z=1.0) -> Volume:
    z = np.arange(n_z, dtype=np.float32)[:, None, None] * spacing_z  # value = z position in mm
    return Volume(np.broadcast_to(z, (n_z, 4, 4)).copy(), (spacing_z, 1.0, 1.0))


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("target_mm", [2.0, 4.0, 0.5])
def test_resample_matches_the_analytic_ramp(antialias, target_mm):
    # A linear field is reproduced exactly by trilinear and by box averaging, so each output voxel
    # must hold the position of its own centre: extent kept, centres at (j + 0.5) * s_out - 0.5 * s_in.
    v = ramp_volume()
    n_out = round(40 * 1.0 / target_mm)
    r = Recipe(intensity="none", window=None, spacing_mm=(target_mm, 1.0, 1.0), grid=(n_out, 4, 4),
               antialias=antialias)
    out = preprocess(v, r)[:, 0, 0]
    s_out = 40 * 1.0 / n_out
    centres = (np.arange(n_out) + 0.5) * s_out - 0.5
    inside = (centres >= 0) & (centres <= 39)  # beyond the outer voxel centres values are clamped
    np.testing.assert_allclose(out[inside], centres[inside], atol=1e-4)


def test_resample_non_integer_factor_with_antialias_is_close():
    v = ramp_volume(n_z=50)
    r = Recipe(intensity="none", window=None, spacing_mm=(3.3, 1.0, 1.0), grid=(15, 4, 4), antialias=True)
    out = preprocess(v, r)[:, 0, 0]
    centres = (np.arange(15) + 0.5) * (50 / 15) - 0.5
    # Box widths vary by one voxel for non-integer factors: within half an input voxel.
    np.testing.assert_allclose(out[1:-1], centres[1:-1], atol=0.5)


def test_antialias_suppresses_aliasing():
    # An alternating +-1 pattern along z (the input Nyquist frequency), shrunk by 5: trilinear lands on
    # single input voxels and reports a full-amplitude pattern that is not there; box averaging of 5
    # voxels leaves at most 1/5 of it.
    a = np.where(np.arange(60) % 2 == 0, 1.0, -1.0).astype(np.float32)[:, None, None] * np.ones((1, 4, 4), np.float32)
    x = torch.from_numpy(a)
    assert float(resize(x, (12, 4, 4), antialias=False).abs().max()) > 0.99
    assert float(resize(x, (12, 4, 4), antialias=True).abs().max()) <= 0.2 + 1e-6


def test_crop_foreground_then_resize():
    a = np.zeros((20, 40, 40), np.float32)
    a[5:15, 10:30, 20:40] = 1.0
    r = Recipe(intensity="minmax", window=None, crop_foreground=True, foreground_threshold=0.0,
               grid=(10, 20, 20), fit="resize")
    out = preprocess(Volume(a, (1.0, 1.0, 1.0)), r)
    np.testing.assert_array_equal(out, np.ones((10, 20, 20), np.float32))


def reference(volume: Volume, r: Recipe) -> np.ndarray:
    """Straightforward order (full-resolution intensity first), to check the faster pipeline against."""
    x = torch.from_numpy(volume.array.copy())
    lo, hi = r.window if r.intensity == "window" else (float(x.min()), float(x.max()))
    x = (x.clamp(lo, hi) - lo) / (hi - lo) * (r.out_range[1] - r.out_range[0]) + r.out_range[0]
    if r.crop_foreground:
        idx = torch.nonzero(x > r.foreground_threshold)
        lo_i, hi_i = idx.min(0).values, idx.max(0).values + 1
        x = x[lo_i[0]:hi_i[0], lo_i[1]:hi_i[1], lo_i[2]:hi_i[2]]
    return resize(x, r.grid, r.antialias).numpy()


@pytest.mark.parametrize("intensity", ["window", "minmax"])
def test_fast_pipeline_equals_the_plain_order(intensity):
    v = phantom()
    v.array[:3] = -3024.0  # padding outside the scan field, cropped away by the foreground step
    r = Recipe(intensity=intensity, window=(-1000.0, 600.0) if intensity == "window" else None,
               crop_foreground=True, foreground_threshold=0.0 if intensity == "minmax" else 0.01,
               grid=(20, 48, 48), fit="resize", antialias=False)
    np.testing.assert_allclose(preprocess(v, r), reference(v, r), atol=1e-5)


def test_unknown_preset_name():
    with pytest.raises(EdgeVLMError, match="no recipe 'nope'"):
        preprocess(phantom((4, 8, 8)), "nope")


@pytest.mark.parametrize(("n", "m"), [(512, 171), (512, 170), (210, 26), (300, 37), (97, 32), (64, 16), (10, 7),
                                      (100, 3), (5, 5)])
def test_box_mean_is_torch_area_resize(n, m):
    # Against torch's adaptive average in float64, along each axis of a fresh random volume; (10, 7) and
    # (100, 3) are not near-integer factors (the fallback), the rest take the strided-run path.
    gen = torch.Generator().manual_seed(n * 1000 + m)
    for dim in range(3):
        shape = [6, 5, 4]
        shape[dim] = n
        x = torch.randn(shape, generator=gen) * 500
        ref = torch.nn.functional.adaptive_avg_pool1d(x.double().movedim(dim, -1).reshape(-1, 1, n), m)
        ref = ref.reshape(*x.movedim(dim, -1).shape[:-1], m).movedim(-1, dim)
        got = box_mean(x, dim, m)
        assert got.shape == ref.shape and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-3)


@pytest.mark.parametrize("flip_dims", [(), (0,), (1, 2), (0, 1, 2)])
def test_slab_wise_clip_flip_and_area_equal_the_plain_order(flip_dims, monkeypatch):
    # A slab of 3 slices (not a divisor of 37) exercises the partial last slab and the reversed z order.
    import edgevlm.preprocess as pre

    monkeypatch.setattr(pre, "_SLAB_BYTES", 3 * 40 * 50 * 4)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(37, 40, 50, generator=gen) * 800
    before = x.clone()
    size = (9, 13, 17)
    got = resize(x, size, antialias=True, clip=(-1000.0, 600.0), flip_dims=flip_dims)
    plain = (torch.flip(x, flip_dims) if flip_dims else x).clamp(-1000.0, 600.0).double()[None, None]
    mid = box_average_shape(tuple(x.shape), size)
    ref = torch.nn.functional.interpolate(torch.nn.functional.interpolate(plain, size=mid, mode="area"), size=size,
                                          mode="trilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-3)
    assert torch.equal(x, before)  # the input is read, never written
