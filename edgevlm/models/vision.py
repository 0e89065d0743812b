"""VisionEncoder3D: a pre-norm 3D ViT over (B, 1, D, H, W) volumes.

Patchify is reshape + Linear, not Conv3d (DESIGN.md decision 2): a stride-equals-kernel Conv3d is the
same map, but as a GEMM it is faster, quantizes as a plain MatMul and exports without 3D convolutions.
Conv3d-shaped checkpoint weights are accepted by `conv3d_to_linear_weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgevlm.models.config import VisionConfig


def patchify(x: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """(B, C, D, H, W) -> (B, N, pd*ph*pw*C), tokens in raster (d, h, w) order."""
    b, c, d, h, w = x.shape
    pd, ph, pw = patch
    x = x.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw)
    # (B, C, gd, pd, gh, ph, gw, pw) -> (B, gd, gh, gw, pd, ph, pw, C)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (d // pd) * (h // ph) * (w // pw), pd * ph * pw * c)


def conv3d_to_linear_weight(weight: Tensor) -> Tensor:
    """Conv3d weight (dim, C, pd, ph, pw) -> Linear weight (dim, pd*ph*pw*C) matching `patchify`."""
    dim = weight.shape[0]
    return weight.permute(0, 2, 3, 4, 1).reshape(dim, -1)


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.heads = cfg.heads
        # Fused qkv with output layout (qkv, heads, head_dim), as M3D-LaMed/MONAI store it.
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Tensor, foreground: Tensor | None = None) -> Tensor:
        b, n, dim = x.shape
        # (B, N, 3*dim) -> (3, B, heads, N, head_dim)
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if self.cfg.attention == "dense":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            from edgevlm.kernels import volumetric_attention

            out = volumetric_attention(
                q, k, v, grid=self.cfg.grid, n_global=int(self.cfg.cls_token), radius=self.cfg.sparse_radius,
                block=self.cfg.sparse_block, foreground=foreground,
            )
        return self.out_proj(out.transpose(1, 2).reshape(b, n, dim))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.linear2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, foreground: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), foreground)
        return x + self.mlp(self.norm2(x))


class VisionEncoder3D(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.dim)
        gd, gh, gw = cfg.grid
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.dim))
        else:  # factorized: RadFM-style separate depth/height/width tables, summed per token
            self.pos_embed_d = nn.Parameter(torch.zeros(gd, cfg.dim))
            self.pos_embed_h = nn.Parameter(torch.zeros(gh, cfg.dim))
            self.pos_embed_w = nn.Parameter(torch.zeros(gw, cfg.dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.cls_token else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()

    def position_embedding(self) -> Tensor:
        """(1, N, dim) for every patch token, whichever parameterization is used."""
        if self.cfg.pos_embed == "learned":
            return self.pos_embed
        gd, gh, gw = self.cfg.grid
        # (gd, 1, 1, dim) + (1, gh, 1, dim) + (1, 1, gw, dim) -> (1, gd*gh*gw, dim)
        pos = self.pos_embed_d[:, None, None] + self.pos_embed_h[None, :, None] + self.pos_embed_w[None, None, :]
        return pos.reshape(1, gd * gh * gw, -1)

    def forward(self, volume: Tensor) -> Tensor:
        """(B, C, D, H, W) preprocessed volume -> (B, [1 +] N, dim) tokens (CLS first when enabled)."""
        expected = (self.cfg.in_channels, *self.cfg.image_size)
        if tuple(volume.shape[1:]) != expected:
            raise ValueError(f"vision input must be (B, {', '.join(map(str, expected))}), got {tuple(volume.shape)}")
        foreground = None
        if self.cfg.attention == "sparse3d" and self.cfg.foreground_threshold is not None:
            from edgevlm.kernels import foreground_from_volume

            foreground = foreground_from_volume(volume, self.cfg.patch_size, self.cfg.foreground_threshold)
        x = self.patch_embed(patchify(volume, self.cfg.patch_size)) + self.position_embedding()
        if self.cls_token is not None:  # CLS is prepended after the position embedding, as M3D-LaMed
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x, foreground)
        return self.norm(x)

    def patch_tokens(self, volume: Tensor) -> Tensor:
        """(B, C, D, H, W) -> (B, N, dim): the grid tokens, CLS dropped (what projectors consume)."""
        x = self(volume)
        return x[:, 1:] if self.cls_token is not None else x
