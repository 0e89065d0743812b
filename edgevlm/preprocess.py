"""Preprocessing recipes: data, not code, so a bundle reproduces its model's training input exactly.

A `Recipe` is JSON (`to_json`/`from_json`); `preprocess(volume, recipe)` turns a `Volume` into a float32
(D, H, W) array of exactly `recipe.grid`. Steps, in this order:

1. reorient: permute/flip the voxel axes (no interpolation) so that x, y, z point to the recipe's
   orientation code. "LPS" means +x towards the patient's Left, +y Posterior, +z Superior: axial slices
   as radiologists view them, ordered inferior to superior. Oblique volumes go to the nearest axes.
2. intensity: "window" clips to [lo, hi] (input units, HU for CT) and maps linearly to out_range;
   "minmax" maps the volume's min..max, "percentile" its p_lo..p_hi percentiles, to out_range.
   Done before resampling, as CT-CLIP and M3D do (clip, then interpolate).
3. crop_foreground: crop to the bounding box of voxels > foreground_threshold (output units).
4. resample to spacing_mm (z, y, x) when set. The output keeps the input's physical extent: n_out =
   round(n_in * s_in / s_out), so the realised spacing differs from the target by under half a voxel
   over the whole extent, and the mapping is symmetric (a flipped input gives the flipped output).
5. fit to grid: "resize" interpolates to the grid (aspect ratio not kept, as M3D does); "crop_pad" centre
   crops or pads with pad_value (output units).

Interpolation is trilinear (`F.interpolate`, align_corners=False) on the whole volume at once.
Antialiasing: trilinear sampling on a downsampled grid aliases (it reads 2 of every f input voxels
along an axis). With `antialias=True`, axes shrunk by f >= 2 are first box-averaged by floor(f)
("area" mode, cheap and exact for integer factors), then trilinear covers the remaining factor < 2.
Presets that reproduce a public model's training turn it off when that model's pipeline did not
antialias (MONAI Resize and CT-CLIP's F.interpolate do not).

Speed: a 512 x 512 CT series is ~1 MB a slice, and every full-resolution pass over it costs more than
all the work after the box average. So with antialiasing, the clip and any flips of step 1 run slab
by slab (a few slices, cache-resident) fused with the in-plane box average, and the full-resolution
volume is read once and never copied. The box average is PyTorch's "area" (adaptive average) exactly,
computed as strided-slice sums over runs of equally shaped windows (`box_mean`): torch's pooling
kernels run one channel on one thread and were 4x slower on this path.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from edgevlm.errors import EdgeVLMError
from edgevlm.volume import Volume

INTENSITY_MODES = ("window", "minmax", "percentile", "none")
FIT_MODES = ("crop_pad", "resize")
_AXIS_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}
# torch.quantile refuses inputs above 2**24 elements; percentiles are taken on a regular subsample.
_QUANTILE_MAX = 2**24 - 1


@dataclass(frozen=True)
class Recipe:
    """How a model's training input was made. All sizes are (D, H, W) = (z, y, x)."""

    name: str = "custom"
    orientation: str | None = "LPS"  # where +x, +y, +z point; None keeps the stored axes
    intensity: str = "window"  # one of INTENSITY_MODES
    window: tuple[float, float] | None = (-1000.0, 1000.0)  # input units, for "window"
    percentiles: tuple[float, float] = (0.5, 99.5)  # for "percentile"
    out_range: tuple[float, float] = (0.0, 1.0)
    crop_foreground: bool = False
    foreground_threshold: float = 0.0  # output units; voxels above it are foreground
    spacing_mm: tuple[float, float, float] | None = None  # (z, y, x) target; None keeps the spacing
    grid: tuple[int, int, int] = (32, 256, 256)  # (D, H, W) of the output
    fit: str = "crop_pad"  # one of FIT_MODES
    pad_value: float = 0.0  # output units
    antialias: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        # Normalise JSON lists to tuples so equality and hashing work after a round trip.
        for name in ("window", "percentiles", "out_range", "spacing_mm", "grid"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> EdgeVLMError:
            return EdgeVLMError(f"recipe '{self.name}': {msg}")

        if self.orientation is not None:
            code = str(self.orientation).upper()
            if len(code) != 3 or sorted(_AXIS_LETTERS[c][0] for c in code if c in _AXIS_LETTERS) != [0, 1, 2]:
                raise bad(f"orientation '{self.orientation}' must be 3 letters, one of L/R, P/A, S/I each")
            object.__setattr__(self, "orientation", code)
        if self.intensity not in INTENSITY_MODES:
            raise bad(f"intensity '{self.intensity}' must be one of {', '.join(INTENSITY_MODES)}")
        if self.intensity == "window" and (
            self.window is None or len(self.window) != 2 or not self.window[0] < self.window[1]
        ):
            raise bad(f"window {self.window} must be [lo, hi] with lo < hi")
        if self.intensity == "percentile" and not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise bad(f"percentiles {self.percentiles} must satisfy 0 <= lo < hi <= 100")
        if len(self.out_range) != 2 or not self.out_range[0] < self.out_range[1]:
            raise bad(f"out_range {self.out_range} must be [lo, hi] with lo < hi")
        if self.spacing_mm is not None and (len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0):
            raise bad(f"spacing_mm {self.spacing_mm} must be three positive millimetre values (z, y, x)")
        if len(self.grid) != 3 or any(int(g) != g or g < 1 for g in self.grid):
            raise bad(f"grid {self.grid} must be three positive integers (D, H, W)")
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        if self.fit not in FIT_MODES:
            raise bad(f"fit '{self.fit}' must be one of {', '.join(FIT_MODES)}")
        if not math.isfinite(self.pad_value):
            raise bad("pad_value must be a finite number")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            # A misspelt key would otherwise silently fall back to a default and change the model input.
            raise EdgeVLMError(f"recipe has unknown keys {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise EdgeVLMError(f"recipe is malformed: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise EdgeVLMError(f"recipe is not valid JSON (line {e.lineno}, column {e.colno})") from None
        if not isinstance(data, dict):
            raise EdgeVLMError("recipe JSON must be an object")
        return cls.from_dict(data)


RECIPES: dict[str, Recipe] = {
    # M3D-LaMed: per-volume min-max to [0, 1], MONAI CropForeground (x > 0), MONAI Resize to 32x256x256
    # (trilinear, no antialiasing). Their inputs were pre-windowed 2D PNG stacks; from HU the closest
    # reproduction is min-max over the volume (MODELS.md). Orientation of their stacks is undocumented;
    # we assume standard axial display (LPS).
    "m3d-lamed": Recipe(
        name="m3d-lamed",
        orientation="LPS",
        intensity="minmax",
        window=None,
        out_range=(0.0, 1.0),
        crop_foreground=True,
        foreground_threshold=0.0,
        grid=(32, 256, 256),
        fit="resize",
        antialias=False,
    ),
    # CT-CLIP / CT-CHAT: clip HU to [-1000, 1000], trilinear to z 1.5 mm, xy 0.75 mm, /1000, centre
    # crop/pad to 240x480x480 with -1 (air after scaling). Their F.interpolate does not antialias.
    "ct-clip": Recipe(
        name="ct-clip",
        orientation="LPS",
        intensity="window",
        window=(-1000.0, 1000.0),
        out_range=(-1.0, 1.0),
        spacing_mm=(1.5, 0.75, 0.75),
        grid=(240, 480, 480),
        fit="crop_pad",
        pad_value=-1.0,
        antialias=False,
    ),
    # edgevlm's demo model (synthetic chest CT): coarse grid, lung window, air pads to 0.
    "demo-chest": Recipe(
        name="demo-chest",
        orientation="LPS",
        intensity="window",
        window=(-1000.0, 600.0),
        out_range=(0.0, 1.0),
        spacing_mm=(10.0, 2.8, 2.8),
        grid=(32, 128, 128),
        fit="crop_pad",
        pad_value=0.0,
        antialias=True,
    ),
}


def get_recipe(name_or_recipe: str | Recipe) -> Recipe:
    if isinstance(name_or_recipe, Recipe):
        return name_or_recipe
    if name_or_recipe not in RECIPES:
        raise EdgeVLMError(f"no recipe '{name_or_recipe}'; known recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name_or_recipe]


def reorient(
    array: torch.Tensor, direction: np.ndarray, spacing_mm: tuple[float, float, float], code: str
) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """Permute/flip (z, y, x) voxel axes so +x, +y, +z point as `code` says; returns the new spacing.

    Each voxel axis is matched to the patient axis its direction vector is closest to.
    """
    view, spacing, flip_dims = _orientation(array, direction, spacing_mm, code)
    return (torch.flip(view, flip_dims) if flip_dims else view), spacing


def _orientation(
    array: torch.Tensor, direction: np.ndarray, spacing_mm: tuple[float, float, float], code: str
) -> tuple[torch.Tensor, tuple[float, float, float], tuple[int, ...]]:
    """`reorient` as a permuted view (no copy) plus the dims still to flip: torch has no negative
    strides, so a flip is a copy, which the slab-wise path makes on a few slices at a time."""
    # World axis (0=LR, 1=PA, 2=SI) each voxel axis (x, y, z) mostly runs along, with its sign in LPS.
    world = np.argmax(np.abs(direction), axis=1)
    if len(set(world.tolist())) != 3:  # two voxel axes closest to the same patient axis (45° oblique)
        world = _assign_axes(direction)
    sign = np.sign(direction[np.arange(3), world])
    spacing_xyz = (spacing_mm[2], spacing_mm[1], spacing_mm[0])
    # For each output axis (x, y, z, in code order): the world axis and direction it must point to.
    src_for_out, flips, new_spacing_xyz = [], [], []
    for letter in code:
        w, want = _AXIS_LETTERS[letter]
        v = int(np.nonzero(world == w)[0][0])  # voxel axis (x=0, y=1, z=2) that runs along w
        src_for_out.append(v)
        flips.append(sign[v] != want)
        new_spacing_xyz.append(spacing_xyz[v])
    # Tensor dims are (z, y, x): voxel axis v lives at dim 2 - v; output axis a goes to dim 2 - a.
    perm = [2 - src_for_out[2 - d] for d in range(3)]
    flip_dims = tuple(2 - a for a in range(3) if flips[a])
    return array.permute(*perm), (new_spacing_xyz[2], new_spacing_xyz[1], new_spacing_xyz[0]), flip_dims


def _assign_axes(direction: np.ndarray) -> np.ndarray:
    """Best one-to-one voxel-axis to world-axis assignment (6 permutations, tried exhaustively)."""
    from itertools import permutations

    best = max(permutations(range(3)), key=lambda p: sum(abs(direction[i, p[i]]) for i in range(3)))
    return np.asarray(best)


def _intensity_range(x: torch.Tensor, recipe: Recipe) -> tuple[float, float] | None:
    """Input values (lo, hi) that map to out_range, or None for "none"."""
    if recipe.intensity == "none":
        return None
    if recipe.intensity == "window":
        lo, hi = recipe.window  # type: ignore[misc]
        return float(lo), float(hi)
    if recipe.intensity == "minmax":
        lo_t, hi_t = torch.aminmax(x)
        return float(lo_t), float(hi_t)
    flat = x.reshape(-1)
    step = max(1, math.ceil(flat.numel() / _QUANTILE_MAX))
    q = torch.tensor([recipe.percentiles[0] / 100, recipe.percentiles[1] / 100], dtype=torch.float32)
    lo, hi = (float(v) for v in torch.quantile(flat[::step].float(), q))
    return lo, hi


def _affine(x: torch.Tensor, value_range: tuple[float, float] | None, recipe: Recipe) -> torch.Tensor:
    """Map [lo, hi] linearly onto out_range (x is already clipped to [lo, hi] where the mode clips)."""
    if value_range is None:
        return x.clone()
    lo, hi = value_range
    out_lo, out_hi = recipe.out_range
    if hi <= lo:  # a constant volume: everything maps to out_lo
        return torch.full_like(x, out_lo)
    scale = (out_hi - out_lo) / (hi - lo)
    return x * scale + (out_lo - lo * scale)


def _foreground_box(x: torch.Tensor, threshold: float) -> tuple[slice, slice, slice]:
    """Bounding box of voxels > threshold, from max projections (two passes, no full-size mask)."""
    zy = x.amax(dim=2)
    per_axis = (zy.amax(dim=1), zy.amax(dim=0), x.amax(dim=1).amax(dim=0))
    box = []
    for proj in per_axis:
        idx = torch.nonzero(proj > threshold).reshape(-1)
        if idx.numel() == 0:  # nothing above the threshold: keep everything rather than return nothing
            return (slice(None), slice(None), slice(None))
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return (box[0], box[1], box[2])


def resampled_shape(shape: tuple[int, ...], spacing_mm: tuple[float, ...], target_mm: tuple[float, ...]) -> tuple:
    """Step 4's output shape: n voxels of s mm become round(n * s / t) voxels spanning the same extent."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing_mm, target_mm, strict=True))


def box_average_shape(shape: tuple[int, ...], size: tuple[int, ...]) -> tuple:
    """The antialias box average's output: axes shrunk by f >= 2 are averaged by floor(f) voxels."""
    return tuple(max(n_out, round(n_in / math.floor(n_in / n_out))) if n_in >= 2 * n_out else n_in
                 for n_in, n_out in zip(shape, size, strict=True))


def resize(x: torch.Tensor, size: tuple[int, int, int], antialias: bool,
           clip: tuple[float, float] | None = None, flip_dims: tuple[int, ...] = ()) -> torch.Tensor:
    """Trilinear resize of a (D, H, W) tensor to `size`, extent-preserving (align_corners=False).

    `clip` (lo, hi) and `flip_dims` are applied to x first; with antialiasing they run slab by slab
    inside the box average, so a full-resolution x is never copied.
    """
    size = tuple(int(s) for s in size)
    # Box-average axes shrunk by f >= 2 by floor(f) first, so trilinear only bridges a factor < 2.
    mid = box_average_shape(tuple(x.shape), size) if antialias else tuple(x.shape)
    x = _clip_flip_box_mean(x, mid, clip, flip_dims) if mid != tuple(x.shape) else _clip_flip(x, clip, flip_dims)
    if tuple(x.shape) == size:
        return x
    return F.interpolate(x[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]


def _clip_flip(x: torch.Tensor, clip: tuple[float, float] | None, flip_dims: tuple[int, ...]) -> torch.Tensor:
    if flip_dims:
        x = torch.flip(x, flip_dims)
    return x if clip is None else x.clamp(*clip)


# Slab of the full-resolution volume processed at once: a few 512 x 512 slices, well inside the L3 cache.
_SLAB_BYTES = 8 << 20


def _clip_flip_box_mean(x: torch.Tensor, size: tuple[int, int, int], clip: tuple[float, float] | None,
                        flip_dims: tuple[int, ...]) -> torch.Tensor:
    """Area-resize (D, H, W) x to `size` after clipping and flipping it, one slab of slices at a time.

    Equal to box_mean over all three axes of _clip_flip(x) (box averages are separable); each slab is
    clipped (and flipped) into a buffer and shrunk in-plane while in cache, so x is read once.
    """
    d, h, w = x.shape
    slab = max(1, _SLAB_BYTES // (h * w * x.element_size()))
    shrunk = torch.empty((d, size[1], size[2]), dtype=x.dtype)
    flip_yx = tuple(dim for dim in flip_dims if dim != 0)
    # Slab buffers allocated once: a fresh tensor per slab is a fresh mapping, paid for in page faults.
    buf = torch.empty((min(slab, d), h, w), dtype=x.dtype) if clip is not None and not flip_yx else None
    rows = torch.empty((min(slab, d), size[1], w), dtype=x.dtype)
    for z0 in range(0, d, slab):
        n = min(slab, d - z0)
        src = x[z0: z0 + n]
        if flip_yx:
            part = torch.flip(src, flip_yx)  # a copy of our own: clipped in place
            if clip is not None:
                part.clamp_(*clip)
        elif buf is not None:
            part = torch.clamp(src, *clip, out=buf[:n])
        else:
            part = src  # only read
        part = box_mean(part, 1, size[1], out=rows[:n])
        if 0 in flip_dims:  # slices are shrunk one by one, so a z flip can wait for the small result
            shrunk[d - z0 - n: d - z0] = torch.flip(box_mean(part, 2, size[2]), (0,))
        else:
            box_mean(part, 2, size[2], out=shrunk[z0: z0 + n])
    return box_mean(shrunk, 0, size[0])


_MAX_RUNS = 16


@functools.lru_cache(maxsize=256)
def _window_runs(n: int, m: int) -> tuple[tuple[int, int, int, int], ...]:
    """Adaptive-average windows of n -> m as runs (i0, i1, start, length): for outputs i0 <= i < i1 the
    window is [start + k*(i - i0), ... + length) with k = round(n / m), torch's start/end rule.
    Cached: a loop over m in Python, asked again for every slab of every study (0.8 ms a study)."""
    k = max(1, round(n / m))
    runs: list[tuple[int, int, int, int]] = []
    for i in range(m):
        start, end = (i * n) // m, -(-(i + 1) * n // m)
        if runs:
            i0, i1, s0, length = runs[-1]
            if i == i1 and start == s0 + k * (i - i0) and end - start == length:
                runs[-1] = (i0, i + 1, s0, length)
                continue
        runs.append((i, i + 1, start, end - start))
    return tuple(runs)


def box_mean(x: torch.Tensor, dim: int, m: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's "area" resize (adaptive average pooling) of `x` along `dim` to m, into `out` if given.

    Windows [floor(i n / m), ceil((i + 1) n / m)) fall into a few runs of equal length and stride
    (`_window_runs`; one to three for the antialias factors), each summed as `length` strided slices.
    """
    n = x.shape[dim]
    if n == m:
        return x if out is None else out.copy_(x)
    shape = list(x.shape)
    shape[dim] = m
    out = torch.empty(shape, dtype=x.dtype) if out is None else out
    runs = _window_runs(n, m)
    if len(runs) > _MAX_RUNS:  # not a near-integer factor (never from `resize`): torch's kernel
        moved = x.movedim(dim, -1)
        pooled = F.adaptive_avg_pool1d(moved.reshape(-1, 1, n), m).reshape(*moved.shape[:-1], m)
        return out.copy_(pooled.movedim(-1, dim))
    k = max(1, round(n / m))
    lead = (slice(None),) * dim
    for i0, i1, start, length in runs:
        dst = out.narrow(dim, i0, i1 - i0)
        stop = start + k * (i1 - i0 - 1) + 1

        def tap(j: int, start: int = start, stop: int = stop) -> torch.Tensor:
            return x[(*lead, slice(start + j, stop + j, k))]  # input j of every window in the run

        if length == 1:
            dst.copy_(tap(0))
        else:
            torch.add(tap(0), tap(1), out=dst)
        for j in range(2, length):
            dst.add_(tap(j))
        if length > 1:
            dst.mul_(1.0 / length)
    return out


def _crop_pad(x: torch.Tensor, grid: tuple[int, int, int], pad_value: float | None) -> torch.Tensor:
    """Centre crop to `grid` where larger; centre pad with pad_value where smaller (None: crop only)."""
    slices, pads = [], []
    for n, g in zip(x.shape, grid, strict=True):
        start = max((n - g) // 2, 0)
        slices.append(slice(start, start + min(n, g)))
        before = max((g - n) // 2, 0)
        pads.append((before, max(g - n, 0) - before))
    x = x[tuple(slices)]
    if pad_value is not None and any(p for pair in pads for p in pair):
        # F.pad lists pads from the last dim backwards.
        flat = [p for pair in reversed(pads) for p in pair]
        x = F.pad(x[None], flat, mode="constant", value=pad_value)[0]
    return x


def preprocess(volume: Volume, recipe: Recipe | str) -> np.ndarray:
    """Apply `recipe` (or a preset name from RECIPES) to `volume`: float32 array of shape recipe.grid.

    Equivalent to the step order in the module docstring. For speed the linear part of the intensity
    map runs last, on the small output: a linear map commutes with cropping and linear interpolation,
    so only the clip (the non-linear part) is applied at full resolution, before interpolating. The
    foreground threshold is converted to input units for the same reason.
    """
    recipe = get_recipe(recipe)
    x = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))
    spacing = tuple(float(s) for s in volume.spacing_mm)
    flip_dims: tuple[int, ...] = ()
    if recipe.orientation is not None:
        x, spacing, flip_dims = _orientation(x, np.asarray(volume.direction), spacing, recipe.orientation)
    # The clip and the flips wait for the first resize, which applies them slab by slab, when nothing
    # before it needs the whole volume in order: a percentile subsample, the foreground box and a
    # centre crop (odd margins) depend on voxel order or values.
    deferred = (recipe.antialias and not recipe.crop_foreground and recipe.intensity != "percentile"
                and (recipe.spacing_mm is not None or recipe.fit == "resize"))
    if flip_dims and not deferred:
        x, flip_dims = torch.flip(x, flip_dims), ()
    value_range = _intensity_range(x, recipe)  # min and max do not depend on voxel order
    clip = value_range if value_range is not None and recipe.intensity in ("window", "percentile") else None
    if clip is not None and not deferred:
        x, clip = x.clamp(*clip), None  # a new tensor: the caller's Volume is never modified
    if recipe.crop_foreground:
        threshold = recipe.foreground_threshold
        if value_range is not None and value_range[1] > value_range[0]:
            lo, hi = value_range
            out_lo, out_hi = recipe.out_range
            threshold = lo + (threshold - out_lo) * (hi - lo) / (out_hi - out_lo)
        x = x[_foreground_box(x, threshold)]
    if recipe.spacing_mm is not None:
        x = resize(x, resampled_shape(tuple(x.shape), spacing, recipe.spacing_mm), recipe.antialias, clip, flip_dims)
        clip, flip_dims = None, ()
    if recipe.fit == "resize":
        x = _affine(resize(x, recipe.grid, recipe.antialias, clip, flip_dims), value_range, recipe)
    else:
        # Crop first (fewer voxels to map), map to output units, then pad with the output-unit pad value.
        x = _crop_pad(_affine(_crop_pad(x, recipe.grid, None), value_range, recipe), recipe.grid, recipe.pad_value)
    out = x.contiguous().numpy().astype(np.float32, copy=False)
    assert out.shape == tuple(recipe.grid), (out.shape, recipe.grid)
    return out
