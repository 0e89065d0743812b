"""The two exported graphs, as small nn.Modules over a MedVLM's own submodules.

`VisionGraph`: preprocessed volume (B, 1, D, H, W) -> projected visual tokens (B, M, dim).
`DecoderStep`: one prefill or decode step over an explicit, per-layer static KV cache.

The same `DecoderStep` runs eagerly in the torch runtime backend (in place, `functional=False`) and is
exported for the ort backend (`functional=True`: the cache update is an out-of-place scatter, i.e.
ONNX ScatterElements, and the updated caches are outputs). It uses the model's own projection, norm,
RoPE and MLP modules; only the attention step is restated (`_attention`), to write the cache with a
scatter on the slot axis instead of `SelfAttention`'s index_copy_ (which exports as three full copies
of each cache per step). The tests hold it to `MedVLM.generate` token for token.

Caches are one tensor per layer (not one stacked (L, ...) tensor): a stacked cache exports as a
select/index_copy/select_scatter chain that copies the whole cache once per layer per step, and
per-layer tensors let the runtime bind each cache buffer by itself (IO binding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgevlm.models import MedVLM
from edgevlm.models.decoder import SelfAttention, apply_rope


class VisionGraph(nn.Module):
    def __init__(self, model: MedVLM):
        super().__init__()
        self.model = model

    def forward(self, volume: Tensor) -> Tensor:
        return self.model.encode_image(volume)


def cache_names(n_layers: int, prefix: str) -> list[str]:
    """Flat per-layer cache names in graph order: past_k_0, past_v_0, past_k_1, ..."""
    return [f"{prefix}_{kv}_{i}" for i in range(n_layers) for kv in ("k", "v")]


def _attention(attn: SelfAttention, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
               input_pos: Tensor, mask: Tensor, functional: bool) -> tuple[Tensor, Tensor, Tensor]:
    """`SelfAttention.forward` with the cache write as scatter on the slot axis (see the module docstring).

    index_copy_ along dim 2 exports as Transpose -> ScatterND -> Transpose, i.e. three full copies of
    every cache per step; scatter along dim 2 is one ScatterElements(axis=2). Same math, same weights.
    """
    cfg = attn.cfg
    b, t, _ = x.shape
    hd, n_kv = cfg.head_dim, cfg.n_kv_heads
    if cfg.fused_qkv:
        q, k, v = attn.qkv_proj(x).split([attn.q_dim, attn.kv_dim, attn.kv_dim], dim=-1)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    # (B, T, heads*hd) -> (B, heads, T, hd)
    q = q.view(b, t, cfg.n_heads, hd).transpose(1, 2)
    k = k.view(b, t, n_kv, hd).transpose(1, 2)
    v = v.view(b, t, n_kv, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    index = input_pos.view(1, 1, t, 1).expand(b, n_kv, t, hd)  # slot of each new key/value
    if functional:  # a graph input is never written: the update is a new tensor (ScatterElements)
        k_cache, v_cache = k_cache.scatter(2, index, k), v_cache.scatter(2, index, v)
    else:  # eager (torch backend): write the preallocated cache in place
        k_cache.scatter_(2, index, k)
        v_cache.scatter_(2, index, v)
    groups = cfg.n_heads // n_kv
    if groups > 1 and functional:
        # GQA in standard ops without copying the cache: the `groups` query heads of each kv head are
        # folded into the query axis, (B, n_heads, T, hd) -> (B, n_kv, groups*T, hd) (head h = kv*groups + g,
        # row g*T + t), and the mask rows tiled to match. Expanding the cache to n_heads instead wrote
        # and read a copy of every layer's whole cache per step.
        q_fold = q.reshape(b, n_kv, groups * t, hd)
        out = F.scaled_dot_product_attention(q_fold, k_cache, v_cache, attn_mask=mask.repeat(1, 1, groups, 1))
        out = out.reshape(b, cfg.n_heads, t, hd)
    else:  # eager: SDPA shares the kv heads itself
        out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=groups > 1)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, attn.q_dim)), k_cache, v_cache


class DecoderStep(nn.Module):
    """(embeds, input_pos, rope_pos, key_valid, *past) -> (last-position logits, *present).

    embeds (B, T, dim); input_pos (T,) int64 cache slots written by this step; rope_pos (B, T) int64
    rotary positions (they differ from the slots for left-padded rows); key_valid (B, S) bool, False
    for slots that must never be attended (left padding); past k/v per layer (B, n_kv, S, head_dim).
    Logits are for the last position only (B, vocab): all that prefill and decode need, and it spares
    prefill a (T, dim) x (dim, vocab) product.
    """

    def __init__(self, model: MedVLM, functional: bool):
        super().__init__()
        self.decoder = model.decoder
        self.functional = functional

    def forward(self, embeds: Tensor, input_pos: Tensor, rope_pos: Tensor, key_valid: Tensor,
                *past: Tensor) -> tuple[Tensor, ...]:
        dec = self.decoder
        s = past[0].shape[2]
        cos = dec.rope_cos[rope_pos].unsqueeze(1).to(embeds.dtype)  # (B, 1, T, hd)
        sin = dec.rope_sin[rope_pos].unsqueeze(1).to(embeds.dtype)
        slots = torch.arange(s, device=embeds.device)
        # Causal over slots, and never a padded slot: (B, 1, T, S), the mask Decoder.forward builds.
        mask = (slots[None, :] <= input_pos[:, None])[None, None] & key_valid[:, None, None, :]
        x = embeds
        present: list[Tensor] = []
        for i, layer in enumerate(dec.layers):
            h, k_cache, v_cache = _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, past[2 * i],
                                             past[2 * i + 1], input_pos, mask, self.functional)
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            present += [k_cache, v_cache]
        logits = dec.lm_head(dec.norm(x[:, -1]))  # (B, vocab)
        return (logits, *present)
