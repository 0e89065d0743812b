"""The one definition of the sparse volumetric attention mask (DESIGN.md decision 6).

Every backend derives its mask from the functions here: the Triton kernel consumes the index form
(`block_indices`), the PyTorch reference and the ONNX formulation the token form (`token_mask`),
FlexAttention the index form through `BlockMask.from_kv_blocks`. So all backends compute one function.

Definition
----------
Token order. A sequence holds ``n_global`` global tokens (CLS, registers, ...) followed by the
``d*h*w`` patch tokens of the grid in raster order (z, y, x), x fastest:
``token(z, y, x) = n_global + (z*h + y)*w + x``.  ``N = n_global + d*h*w``.

Blocks. The sequence (global tokens included) is cut into blocks of ``block`` consecutive tokens;
the last block is ragged when ``block`` does not divide ``N``. Query blocks and key blocks are the
same blocks (``nQB == nKB == ceil(N / block)``).

Local rule. Key block ``kb`` is a neighbour of query block ``qb`` when some patch token of ``kb``
lies within Chebyshev distance ``radius`` (in grid cells, i.e. ``max(|dz|, |dy|, |dx|) <= radius``)
of some patch token of ``qb``.

Global rule. A block holding any global token attends to every key block, and every query block
attends to a block holding any global token.

Foreground rule (optional, per batch element). With a boolean ``foreground`` of shape (B, d*h*w)
(e.g. "not air", `foreground_from_volume`), a key block is visited only when it holds a foreground
patch token or a global token. This applies to every query block, global ones included.

    allowed[b, qb, kb] = (local(qb, kb) or global(qb) or global(kb))
                         and (foreground is None or fg(b, kb) or global(kb))

Granularity. The mask is block-sparse and nothing finer: inside a visited (qb, kb) pair every query
attends to every real key token (background tokens in a visited block included); key positions at or
past N never count. `token_mask` is exactly this block mask expanded to tokens.

Empty rows. With the foreground rule and no global tokens a query block can have no allowed key
block. Its output is defined as ZERO (not NaN): the kernel writes zeros, the references replace the
row explicitly. With ``n_global > 0`` no row is ever empty.

Why raster-order blocks rather than 3D tiles: tokens stay in the order the encoder produces them, so
no gather/scatter permutation is needed around attention and the mask is a pure function of
(grid, n_global, radius, block). A block then spans ``block / w`` rows of one or two z-planes; its
neighbourhood is ``2*radius + 1`` z-planes of ``rows + 2*radius`` rows each, which is sparse
enough on the grids the encoders use (e.g. 16x32x32 + 1 global token, block 128: radius 1 visits
8 % of the block pairs, radius 2 12 %; 32x32x32, radius 4: 16 %).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

Grid = tuple[int, int, int]


def _check_grid(grid: Grid, n_global: int, radius: int, block: int) -> None:
    assert len(grid) == 3 and all(int(g) >= 1 for g in grid), f"grid must be 3 positive ints, got {grid}"
    assert n_global >= 0, f"n_global must be >= 0, got {n_global}"
    assert radius >= 0, f"radius must be >= 0 (grid cells), got {radius}"
    assert block >= 1, f"block must be >= 1 token, got {block}"


def num_tokens(grid: Grid, n_global: int) -> int:
    d, h, w = grid
    return n_global + d * h * w


def num_blocks(grid: Grid, n_global: int, block: int) -> int:
    return -(-num_tokens(grid, n_global) // block)


@functools.lru_cache(maxsize=64)
def _local_block_mask_np(grid: Grid, n_global: int, radius: int, block: int) -> np.ndarray:
    """(nQB, nKB) bool: local rule OR global rule. Computed in numpy, never in torch: it depends on
    Python ints only, so it must stay a constant (an ONNX initializer) rather than be traced into the
    graph when the caller is exported."""
    d, h, w = grid
    n = num_tokens(grid, n_global)
    nb = num_blocks(grid, n_global, block)
    tok_block = np.arange(n) // block  # (N,) block of each token
    cell_block = tok_block[n_global:]  # (d*h*w,) block of each patch token, raster order

    # Occupancy of each query block on the grid, (nQB, d, h, w). Dilating it by a cube of side 2r+1
    # gives exactly the cells within Chebyshev distance r; a cube dilation is separable into one 1D
    # dilation per axis.
    reach = np.zeros((nb, d * h * w), dtype=bool)
    reach[cell_block, np.arange(d * h * w)] = True
    reach = reach.reshape(nb, d, h, w)
    for axis, size in ((1, d), (2, h), (3, w)):
        r = min(radius, size - 1)  # larger radii reach no further cells along this axis
        src = reach.copy()
        for s in range(1, r + 1):
            lo = [slice(None)] * 4
            hi = [slice(None)] * 4
            lo[axis], hi[axis] = slice(0, size - s), slice(s, size)
            reach[tuple(hi)] |= src[tuple(lo)]  # cell i reaches i + s
            reach[tuple(lo)] |= src[tuple(hi)]  # cell i reaches i - s
    reach = reach.reshape(nb, d * h * w)  # cells some query token of the block reaches

    # Key block kb is a neighbour when any of its cells is reached. Blocks are contiguous token ranges,
    # so place the cells at their token positions and OR-reduce each run of `block` tokens.
    by_token = np.zeros((nb, nb * block), dtype=bool)
    by_token[:, n_global:n] = reach
    allowed = by_token.reshape(nb, nb, block).any(axis=2)

    if n_global > 0:
        g = np.unique(tok_block[:n_global])  # blocks holding a global token
        allowed[g, :] = True
        allowed[:, g] = True
    allowed.setflags(write=False)
    return allowed


def local_block_mask(
    grid: Grid, n_global: int, radius: int, block: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(nQB, nKB) bool: the mask without the foreground rule (same for every batch element)."""
    grid = tuple(int(g) for g in grid)
    _check_grid(grid, n_global, radius, block)
    m = torch.from_numpy(_local_block_mask_np(grid, int(n_global), int(radius), int(block)).copy())
    return m if device is None else m.to(device)


def global_blocks(grid: Grid, n_global: int, block: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(nKB,) bool: blocks that hold a global token."""
    nb = num_blocks(grid, n_global, block)
    return torch.arange(nb, device=device) * block < n_global


def foreground_blocks(foreground: torch.Tensor, n_global: int, block: int) -> torch.Tensor:
    """(B, d*h*w) bool -> (B, nKB) bool: key blocks holding a foreground patch token or a global token.
    Standard ops only (pad, view, any), so it traces into ONNX when foreground comes from the input."""
    assert foreground.dim() == 2, f"foreground must be (B, d*h*w) bool, got shape {tuple(foreground.shape)}"
    b, cells = foreground.shape
    n = n_global + cells
    nb = -(-n // block)
    fg = foreground.to(torch.bool)
    # Global tokens count as foreground; padding past N does not.
    fg = torch.cat(
        [
            torch.ones(b, n_global, dtype=torch.bool, device=fg.device),
            fg,
            torch.zeros(b, nb * block - n, dtype=torch.bool, device=fg.device),
        ],
        dim=1,
    )
    return fg.view(b, nb, block).any(dim=-1)


def block_mask(
    grid: Grid,
    n_global: int,
    radius: int,
    block: int,
    foreground: torch.Tensor | None = None,
) -> torch.Tensor:
    """BoolTensor (B, nQB, nKB): allowed[b, qb, kb] as defined in the module docstring.
    B is 1 without a foreground (the mask broadcasts over the batch)."""
    device = None if foreground is None else foreground.device
    local = local_block_mask(grid, n_global, radius, block, device)  # (nQB, nKB)
    if foreground is None:
        return local.unsqueeze(0)
    d, h, w = grid
    assert foreground.shape[-1] == d * h * w, (
        f"foreground has {foreground.shape[-1]} cells per batch element but grid {grid} has {d * h * w}"
    )
    fg = foreground_blocks(foreground, n_global, block)  # (B, nKB)
    return local.unsqueeze(0) & fg.unsqueeze(1)


def token_mask(
    grid: Grid,
    n_global: int,
    radius: int,
    block: int,
    foreground: torch.Tensor | None = None,
) -> torch.Tensor:
    """BoolTensor (B, 1, N, N): the block mask expanded to tokens, i.e. exactly what the kernel computes.
    Usable as the `attn_mask` of scaled_dot_product_attention (True = attend)."""
    bm = block_mask(grid, n_global, radius, block, foreground)  # (B, nQB, nKB)
    return expand_block_mask(bm, num_tokens(grid, n_global), block)


def expand_block_mask(bm: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """(B, nQB, nKB) -> (B, 1, N, N) by gathering each token's block (index_select: exports to Gather)."""
    tok_block = torch.arange(n, device=bm.device) // block  # (N,)
    tm = bm.index_select(1, tok_block).index_select(2, tok_block)  # (B, N, N)
    return tm.unsqueeze(1)


def block_indices(bm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse index form consumed by the kernel (FlexAttention's kv_num_blocks / kv_indices layout).

    bm: (B, nQB, nKB) bool. Returns
      kv_num_blocks: (B, nQB) int32, number of allowed key blocks of each query block;
      kv_indices:    (B, nQB, nKB) int32, allowed key blocks in ascending order first, then the
                     disallowed ones (never read: only the first kv_num_blocks entries count).
    """
    assert bm.dim() == 3 and bm.dtype == torch.bool, f"expected (B, nQB, nKB) bool, got {bm.dtype} {tuple(bm.shape)}"
    kv_num = bm.sum(dim=-1, dtype=torch.int32)
    # Stable descending sort of the 0/1 mask puts the allowed blocks first, in ascending block order.
    kv_idx = torch.sort(bm.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return kv_num.contiguous(), kv_idx.contiguous()


def indices_to_block_mask(kv_num: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """Inverse of `block_indices` (for tests and FlexAttention cross-checks): (B, nQB, nKB) bool."""
    nkb = kv_idx.shape[-1]
    valid = torch.arange(nkb, device=kv_idx.device) < kv_num.unsqueeze(-1)  # (B, nQB, nKB)
    bm = torch.zeros(kv_idx.shape, dtype=torch.bool, device=kv_idx.device)
    bm.scatter_(-1, kv_idx.long(), valid)
    return bm


@dataclass(frozen=True)
class SparseSpec:
    """Everything that defines one sparse volumetric attention pattern.

    foreground: optional (B, d*h*w) bool; None means every patch token is foreground.
    """

    grid: Grid
    n_global: int
    radius: int
    block: int
    foreground: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        _check_grid(self.grid, self.n_global, self.radius, self.block)
        if self.foreground is not None:
            d, h, w = self.grid
            assert self.foreground.dim() == 2 and self.foreground.shape[1] == d * h * w, (
                f"foreground must be (B, {d * h * w}) for grid {self.grid}, got {tuple(self.foreground.shape)}"
            )

    @property
    def n_tokens(self) -> int:
        return num_tokens(self.grid, self.n_global)

    @property
    def n_blocks(self) -> int:
        return num_blocks(self.grid, self.n_global, self.block)

    def block_mask(self) -> torch.Tensor:
        return block_mask(self.grid, self.n_global, self.radius, self.block, self.foreground)

    def token_mask(self) -> torch.Tensor:
        return token_mask(self.grid, self.n_global, self.radius, self.block, self.foreground)

    def indices(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.foreground is None:
            dev = torch.device("cpu") if device is None else torch.device(device)
            return _cached_indices(self.grid, self.n_global, self.radius, self.block, str(dev))
        return block_indices(self.block_mask())

    def density(self) -> float:
        """Fraction of (query block, key block) pairs visited, averaged over the batch."""
        return float(self.block_mask().float().mean())


@functools.lru_cache(maxsize=64)
def _cached_indices(
    grid: Grid, n_global: int, radius: int, block: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    # Without a foreground the index form depends on Python ints only: build it once per device.
    return block_indices(local_block_mask(grid, n_global, radius, block, device).unsqueeze(0))
