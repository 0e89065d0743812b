"""Projector: vision tokens on the (d, h, w) grid -> decoder-width visual tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgevlm.models.config import ProjectorConfig
from edgevlm.models.decoder import RMSNorm


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, vision_dim: int, decoder_dim: int, grid: tuple[int, int, int]):
        super().__init__()
        self.cfg = cfg
        self.grid = grid
        hidden = cfg.hidden_dim or decoder_dim
        # Linear-GELU-Linear; attribute names follow M3D-LaMed's `projector.0` / `projector.2`.
        self.linear1 = nn.Linear(vision_dim, hidden)
        self.linear2 = nn.Linear(hidden, decoder_dim)
        self.norm = RMSNorm(decoder_dim, eps=1e-6) if cfg.output_norm else None
        pool = cfg.pool if cfg.kind == "spp" else (1, 1, 1)
        n_tokens = math.prod(g // p for g, p in zip(grid, pool, strict=True))  # as avg_pool3d floors
        # Zero at the start: a checkpoint without the table loads into this shape and behaves as before.
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, decoder_dim)) if cfg.pos_embed else None

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, vision_dim) grid tokens in raster order -> (B, M, decoder_dim)."""
        if self.cfg.kind == "spp":
            b, _, c = tokens.shape
            d, h, w = self.grid
            # (B, N, C) -> (B, C, d, h, w) -> pooled (B, C, d', h', w') -> (B, M, C)
            x = tokens.transpose(1, 2).reshape(b, c, d, h, w)
            x = F.avg_pool3d(x, kernel_size=self.cfg.pool, stride=self.cfg.pool)
            tokens = x.flatten(2).transpose(1, 2)
        tokens = self.linear2(F.gelu(self.linear1(tokens)))
        tokens = tokens if self.norm is None else self.norm(tokens)
        return tokens if self.pos_embed is None else tokens + self.pos_embed
