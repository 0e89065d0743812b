"""The one mask definition (edgevlm.kernels.mask3d) against a brute-force reading of its docstring,
and the equivalence of its three forms: block mask, token mask, sparse index form."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from edgevlm.kernels import foreground_from_volume
from edgevlm.kernels.mask3d import (
    SparseSpec,
    block_indices,
    block_mask,
    expand_block_mask,
    indices_to_block_mask,
    num_blocks,
    token_mask,
)


def brute_block_mask(grid, n_global, radius, block, foreground=None) -> torch.Tensor:
    """Token-level Chebyshev distances reduced per block pair, straight from the definition."""
    d, h, w = grid
    n = n_global + d * h * w
    nb = math.ceil(n / block)
    cells = torch.arange(d * h * w)
    zyx = torch.stack([cells // (h * w), (cells // w) % h, cells % w], dim=1)  # (cells, 3)
    cheb = (zyx[:, None, :] - zyx[None, :, :]).abs().amax(-1)  # (cells, cells)
    is_global = torch.arange(n) < n_global
    near = torch.zeros(n, n, dtype=torch.bool)
    near[n_global:, n_global:] = cheb <= radius
    tok_block = torch.arange(n) // block
    batches = 1 if foreground is None else foreground.shape[0]
    out = torch.zeros(batches, nb, nb, dtype=torch.bool)
    for b in range(batches):
        fg_tok = torch.ones(n, dtype=torch.bool)
        if foreground is not None:
            fg_tok[n_global:] = foreground[b]
        for qb in range(nb):
            qt = tok_block == qb
            for kb in range(nb):
                kt = tok_block == kb
                local = bool(near[qt][:, kt].any())
                glob = bool(is_global[qt].any() or is_global[kt].any())
                fg_ok = bool((fg_tok[kt] | is_global[kt]).any())
                out[b, qb, kb] = (local or glob) and fg_ok
    return out


CASES = [
    # grid, n_global, radius, block
    ((3, 4, 5), 0, 1, 8),
    ((3, 4, 5), 1, 1, 16),
    ((2, 5, 7), 2, 0, 8),
    ((4, 3, 6), 1, 2, 16),
    ((1, 6, 6), 0, 1, 4),
    ((5, 2, 3), 3, 1, 5),  # block not a power of two: the definition allows it (the kernel does not)
]


@pytest.mark.parametrize(("grid", "n_global", "radius", "block"), CASES)
def test_block_mask_matches_definition(grid, n_global, radius, block, seed):
    d, h, w = grid
    fg = torch.rand(2, d * h * w) < 0.3
    assert torch.equal(block_mask(grid, n_global, radius, block), brute_block_mask(grid, n_global, radius, block))
    got = block_mask(grid, n_global, radius, block, fg)
    assert torch.equal(got, brute_block_mask(grid, n_global, radius, block, fg)), f"seed={seed}"


def test_radius_zero_is_own_neighbourhood_only():
    # Without global tokens a block's cells lie only in that block: radius 0 gives the identity.
    for grid, block in (((3, 4, 5), 8), ((2, 3, 3), 4), ((4, 4, 4), 16)):
        bm = block_mask(grid, 0, 0, block)[0]
        assert torch.equal(bm, torch.eye(num_blocks(grid, 0, block), dtype=torch.bool))


def test_radius_zero_is_cell_exact():
    # One token per block: radius 0 is exactly "self", radius 1 exactly the 3x3x3 cube.
    grid = (3, 4, 5)
    tm0 = token_mask(grid, 0, 0, 1)[0, 0]
    assert torch.equal(tm0, torch.eye(60, dtype=torch.bool))
    tm1 = token_mask(grid, 0, 1, 1)[0, 0]
    assert int(tm1[(1 * 4 + 1) * 5 + 1].sum()) == 27  # interior cell (1, 1, 1)
    assert int(tm1[0].sum()) == 8  # corner cell (0, 0, 0)


def test_huge_radius_is_dense():
    for grid, n_global, block in (((3, 4, 5), 0, 8), ((2, 5, 7), 1, 16), ((6, 1, 2), 2, 4)):
        bm = block_mask(grid, n_global, 10**6, block)
        assert bool(bm.all())


def test_global_tokens_attend_and_are_attended_everywhere():
    grid, block = (4, 4, 4), 8
    for n_global in (1, 3, 9):  # 9: globals spill into a second block
        tm = token_mask(grid, n_global, 0, block)[0, 0]
        assert bool(tm[:n_global].all()), "global queries must see every key"
        assert bool(tm[:, :n_global].all()), "every query must see the global keys"


def test_foreground_restriction():
    grid, block = (3, 4, 4), 8
    cells = 48
    # No foreground at all, no global token: every row empty.
    none = torch.zeros(1, cells, dtype=torch.bool)
    assert not bool(block_mask(grid, 0, 10, block, none).any())
    # With global tokens only the global key blocks remain, and no row is empty.
    bm = block_mask(grid, 2, 10, block, none)[0]
    assert bool(bm[:, 0].all()) and not bool(bm[:, 1:].any())
    # A single foreground cell opens exactly its key block (huge radius, no globals).
    one = torch.zeros(1, cells, dtype=torch.bool)
    one[0, 37] = True
    bm = block_mask(grid, 0, 10, block, one)[0]
    assert torch.equal(bm.any(0).nonzero().flatten(), torch.tensor([37 // block]))
    # Background tokens inside a visited block are still attended (block granularity).
    tm = token_mask(grid, 0, 10, block, one)[0, 0]
    assert bool(tm[:, (37 // block) * block : (37 // block + 1) * block].all())


@pytest.mark.parametrize(("grid", "n_global", "radius", "block"), CASES)
def test_three_forms_are_one_mask(grid, n_global, radius, block, seed):
    d, h, w = grid
    fg = torch.rand(3, d * h * w) < 0.4
    for foreground in (None, fg):
        bm = block_mask(grid, n_global, radius, block, foreground)
        tm = token_mask(grid, n_global, radius, block, foreground)
        n = n_global + d * h * w
        assert tm.shape == (bm.shape[0], 1, n, n)
        # token mask == block mask expanded, checked token by token
        tb = torch.arange(n) // block
        assert torch.equal(tm[:, 0], bm[:, tb][:, :, tb]), f"seed={seed}"
        assert torch.equal(expand_block_mask(bm, n, block), tm)
        # index form: counts, ascending order, round trip
        kv_num, kv_idx = block_indices(bm)
        assert kv_num.dtype == torch.int32 and kv_idx.dtype == torch.int32
        assert torch.equal(kv_num, bm.sum(-1).int())
        for b in range(bm.shape[0]):
            for qb in range(bm.shape[1]):
                listed = kv_idx[b, qb, : kv_num[b, qb]]
                assert torch.equal(listed.long(), bm[b, qb].nonzero().flatten())
        assert torch.equal(indices_to_block_mask(kv_num, kv_idx), bm)
        spec = SparseSpec(grid, n_global, radius, block, foreground)
        sn, si = spec.indices()
        assert torch.equal(sn, kv_num) and torch.equal(si, kv_idx)


def test_foreground_from_volume_counts_voxels(seed):
    patch = (2, 2, 3)
    vol = torch.rand(2, 1, 4, 6, 9)  # grid (2, 3, 3), 12 voxels per patch
    thr, frac = 0.7, 0.25  # foreground: at least 3 of 12 voxels above 0.7
    got = foreground_from_volume(vol, patch, thr, frac)
    above = (vol[:, 0] > thr).view(2, 2, 2, 3, 2, 3, 3).permute(0, 1, 3, 5, 2, 4, 6).reshape(2, 18, 12)
    assert torch.equal(got, above.sum(-1) >= 3), f"seed={seed}"
    assert got.dtype == torch.bool and got.shape == (2, 18)
    two = torch.rand(2, 2, 4, 6, 9)  # two channels: a voxel counts when any channel is above
    any_above = (two > thr).any(dim=1).view(2, 2, 2, 3, 2, 3, 3).permute(0, 1, 3, 5, 2, 4, 6).reshape(2, 18, 12)
    assert torch.equal(foreground_from_volume(two, patch, thr, frac), any_above.sum(-1) >= 3), f"seed={seed}"


def test_kernels_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, edgevlm.kernels as K\n"
        "assert not K.HAS_TRITON\n"
        "q = torch.randn(1, 2, 1 + 24, 16)\n"
        "out = K.volumetric_attention(q, q, q, (2, 3, 4), 1, 1, 16, None)\n"
        "assert out.shape == q.shape and torch.isfinite(out).all()\n"
        "w = torch.randn(8, 8)\n"
        "t = K.patch_embed(torch.randn(1, 1, 4, 4, 4), w, None, None, (2, 2, 2), (0.0, 1.0))\n"
        "assert t.shape == (1, 8, 8)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
