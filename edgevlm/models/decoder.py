"""Decoder: a small explicit Llama-family causal LM with a static, preallocated KV cache.

RMSNorm, RoPE (HF's rotate-half convention, so imported weights need no permutation), grouped-query
attention and SwiGLU, with switches for Phi-3 (fused qkv and gate_up) and Qwen2 (qkv bias). Parameter
names follow the Hugging Face layout (`layers.0.self_attn.q_proj`, ...) so importers are key maps.

The KV cache is two tensors per model, (n_layers, B, n_kv_heads, max_seq, head_dim), allocated once by
`setup_cache` and written at explicit positions: shapes never change while decoding, which is what a
static-shape ONNX/TensorRT graph needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgevlm.models.config import DecoderConfig


@dataclass
class KVCache:
    k: Tensor  # (n_layers, B, n_kv_heads, max_seq, head_dim)
    v: Tensor

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]


def setup_cache(cfg: DecoderConfig, batch: int, max_seq_len: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> KVCache:
    if max_seq_len > cfg.max_seq_len:
        raise ValueError(f"KV cache of {max_seq_len} positions exceeds the decoder's max_seq_len {cfg.max_seq_len}")
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_seq_len, cfg.head_dim)
    return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))


def rope_inv_freq(cfg: DecoderConfig) -> tuple[Tensor, float]:
    """Inverse frequencies (head_dim/2,) after the configured scaling, and the cos/sin amplitude scale."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device="cpu") / hd))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    amplitude = 1.0
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = ((original / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        ramp = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_mid = (wavelen <= original / low) & (wavelen >= original / high)
        inv_freq = torch.where(is_mid, ramp, scaled)
    elif kind in ("longrope", "su"):
        # Phi-3 long context: per-frequency factors; the long set applies when the cache exceeds the
        # original context, with the attention amplitude scale of the reference implementation.
        original = int(scaling["original_max_position_embeddings"])
        factors = scaling["long_factor"] if cfg.max_seq_len > original else scaling["short_factor"]
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float64, device="cpu")
        ratio = cfg.max_seq_len / original
        amplitude = 1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(original))
    else:
        raise ValueError(f"unsupported rope_scaling type {kind!r} (have: default, linear, llama3, longrope)")
    return inv_freq, amplitude


def rope_tables(cfg: DecoderConfig) -> tuple[Tensor, Tensor]:
    """cos/sin tables (max_seq_len, head_dim) in the rotate-half layout, float32 on the CPU."""
    inv_freq, amplitude = rope_inv_freq(cfg)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64, device="cpu"), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * amplitude).float(), (angles.sin() * amplitude).float()


def rope_tables_at(cos: Tensor, sin: Tensor, rope_pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Rows of the (max_seq_len, hd) rotary tables at rope_pos (B, T), as (B, 1, T, hd) in `dtype`."""
    return cos[rope_pos].unsqueeze(1).to(dtype), sin[rope_pos].unsqueeze(1).to(dtype)


def attention_mask(input_pos: Tensor, cache_len: int, key_valid: Tensor | None) -> Tensor:
    """(B or 1, 1, T, S) bool: query at slot input_pos[t] sees the cache slots <= it that key_valid marks."""
    slots = torch.arange(cache_len, device=input_pos.device)
    mask = (slots[None, :] <= input_pos[:, None])[None, None]
    return mask if key_valid is None else mask & key_valid[:, None, None, :]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, heads, T, hd); cos/sin (B, 1, T, hd)."""
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.q_dim = cfg.n_heads * cfg.head_dim
        self.kv_dim = cfg.n_kv_heads * cfg.head_dim
        if cfg.fused_qkv:
            self.qkv_proj = nn.Linear(cfg.dim, self.q_dim + 2 * self.kv_dim, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(cfg.dim, self.q_dim, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(cfg.dim, self.kv_dim, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(cfg.dim, self.kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layer: int, cache: KVCache | None,
                input_pos: Tensor | None, mask: Tensor | None, kv_len: int | None = None) -> Tensor:
        b, t, _ = x.shape
        hd, n_kv = self.cfg.head_dim, self.cfg.n_kv_heads
        if self.cfg.fused_qkv:
            q, k, v = self.qkv_proj(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # (B, T, heads*hd) -> (B, heads, T, hd)
        q = q.view(b, t, self.cfg.n_heads, hd).transpose(1, 2)
        k = k.view(b, t, n_kv, hd).transpose(1, 2)
        v = v.view(b, t, n_kv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # Write this step's keys/values at their slots, then attend over the slots written so far
            # (`kv_len`; the slots after it are masked anyway) or, without it, the whole static cache.
            cache.k[layer].index_copy_(2, input_pos, k)
            cache.v[layer].index_copy_(2, input_pos, v)
            k, v = cache.k[layer], cache.v[layer]
            if kv_len is not None:  # the mask is already that wide (Decoder.forward)
                k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        groups = self.cfg.n_heads // n_kv
        # GQA: SDPA maps query head h to kv head h // groups itself (the ONNX graph folds the query heads
        # instead, export/graphs.py). Expanding the kv heads to n_heads copied the whole cache twice per
        # layer and step: the demo teacher decoded at 1.66 ms/token with it, 1.46 without.
        gqa = groups > 1
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.q_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.fused_gate_up:
            self.gate_up_proj = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)
        else:
            self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
            self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.cfg.fused_gate_up:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layer: int, cache: KVCache | None,
                input_pos: Tensor | None, mask: Tensor | None, kv_len: int | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache, input_pos, mask, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Derived from the config, not weights: non-persistent, and always real (also on "meta").
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, embeds: Tensor, input_pos: Tensor | None = None, cache: KVCache | None = None,
                rope_pos: Tensor | None = None, key_valid: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None, kv_len: int | None = None,
                last_only: bool = False, return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B, T, vocab) for input embeddings (B, T, dim).

        Without a cache: plain causal attention over the T tokens (training, scoring).
        With a cache: `input_pos` (T,) are the cache slots written by this call; each query attends to
        the slots <= its own that `key_valid` (B, S) marks valid (False for left padding). `rope_pos`
        (B, T) are the rotary positions, which differ from the slots when a prompt is left-padded.
        `rope` (cos, sin), each (B, 1, T, hd), and `mask` (B, 1, T, S) replace what rope_pos and key_valid
        would give: a caller that steps many times (`MedVLM.generate`) builds them once and passes views.
        `kv_len`: with a cache, attend over slots [0, kv_len) only (every slot this call may see must lie
        there). `last_only`: logits (B, 1, vocab) of the last position, all a generation step needs.
        `return_hidden`: (logits, the final normed hidden states lm_head reads), for training-only heads.
        """
        b, t, _ = embeds.shape
        if input_pos is None:
            input_pos = torch.arange(t, device=embeds.device)
        if rope is None:
            if rope_pos is None:
                rope_pos = input_pos[None].expand(b, t)
            rope = rope_tables_at(self.rope_cos, self.rope_sin, rope_pos, embeds.dtype)
        cos, sin = rope
        if cache is not None and mask is None:
            mask = attention_mask(input_pos, cache.max_seq_len, key_valid)
        if kv_len is not None and mask is not None:
            mask = mask[..., :kv_len]  # once here, not per layer
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, cache, input_pos, mask, kv_len)
        hidden = self.norm(x[:, -1:] if last_only else x)
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits
