"""Parameter counts, weight bytes and a peak-memory estimate, computed on the meta device.

Nothing here allocates weights, so a 7 B-parameter config is summarised in milliseconds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgevlm.models.config import MedVLMConfig
from edgevlm.models.medvlm import MedVLM

# Bytes per weight. int4 is block-wise (block 32) with one fp16 scale per block: 0.5 + 2/32.
BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5 + 2 / 32}


def count_params(module: nn.Module) -> int:
    """Unique parameters (a tied lm_head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def model_summary(cfg: MedVLMConfig, prompt_tokens: int = 64) -> dict[str, Any]:
    with torch.device("meta"):
        model = MedVLM(cfg)
    dec = model.decoder
    parts = {
        "vision_encoder": count_params(model.vision),
        "projector": count_params(model.projector),
        "decoder_embeddings": dec.embed_tokens.weight.numel(),
        "decoder_layers": count_params(dec.layers) + count_params(dec.norm),
        "lm_head": 0 if cfg.decoder.tie_embeddings else dec.lm_head.weight.numel(),
    }
    total = count_params(model)
    assert total == sum(parts.values()), "every parameter belongs to exactly one part"
    return {
        "name": cfg.name,
        "params": parts,
        "params_total": total,
        "weight_bytes": {p: int(total * b) for p, b in BYTES_PER_PARAM.items()},
        "visual_tokens": cfg.num_visual_tokens,
        "vision_tokens": cfg.vision.num_patches + int(cfg.vision.cls_token),
        "peak_memory_bytes": {p: peak_memory_estimate(cfg, total, p, prompt_tokens) for p in BYTES_PER_PARAM},
    }


def peak_memory_estimate(cfg: MedVLMConfig, params: int, precision: str, prompt_tokens: int) -> int:
    """Upper-bound estimate of memory for one study at batch 1: weights + KV cache + the larger of the
    vision and decoder activations. Attention scores are counted as if materialised (math kernel)."""
    act = 2 if precision == "fp16" else 4  # int8/int4 weights still run fp32 activations on CPU
    v, d = cfg.vision, cfg.decoder
    n = v.num_patches + int(v.cls_token)
    vision_act = n * (6 * v.dim + v.mlp_dim) * act + v.heads * n * n * act
    seq = 1 + cfg.num_visual_tokens + prompt_tokens + cfg.prompt.max_new_tokens
    kv_cache = 2 * d.n_layers * d.n_kv_heads * d.head_dim * seq * act
    prefill = seq * (4 * d.dim + 3 * d.intermediate_size) * act + d.n_heads * seq * seq * act
    logits = seq * d.vocab_size * 4
    volume = v.in_channels * v.image_size[0] * v.image_size[1] * v.image_size[2] * 4
    return int(params * BYTES_PER_PARAM[precision] + kv_cache + max(vision_act + volume, prefill + logits))
