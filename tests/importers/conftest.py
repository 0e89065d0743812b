"""Synthetic M3D-LaMed checkpoints: M3D's exact key names and layout, reduced widths and depths.

The key names follow BAAI-DCAI/M3D (LaMed/src/model: LamedPhi3ForCausalLM / LamedLlamaForCausalLM with a
ViT3DTower on MONAI 1.3.0 blocks, the spp projector and the SegVol module) as saved by Hugging Face
`save_pretrained`: sharded safetensors + model.safetensors.index.json + config.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

VIT = "model.vision_tower.vision_tower."


def vit_state(prefix: str = VIT, depth: int = 2, dim: int = 96, mlp: int = 192, patch_dim: int = 1024,
              n_patches: int = 2048, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    g = gen or torch.Generator().manual_seed(0)

    def rnd(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def ln(name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": 1 + rnd(dim, scale=0.1), f"{name}.bias": rnd(dim)}

    s = {
        f"{prefix}patch_embedding.patch_embeddings.1.weight": rnd(dim, patch_dim),
        f"{prefix}patch_embedding.patch_embeddings.1.bias": rnd(dim),
        f"{prefix}patch_embedding.position_embeddings": rnd(1, n_patches, dim, scale=0.5),
        f"{prefix}cls_token": rnd(1, 1, dim, scale=0.5),
        **{f"{prefix}{k}": v for k, v in ln("norm").items()},
    }
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        s.update({f"{b}{k}": v for k, v in ln("norm1").items()})
        s.update({f"{b}{k}": v for k, v in ln("norm2").items()})
        s[f"{b}attn.qkv.weight"] = rnd(3 * dim, dim, scale=0.15)  # no bias: MONAI ViT default
        s[f"{b}attn.out_proj.weight"] = rnd(dim, dim, scale=0.1)
        s[f"{b}attn.out_proj.bias"] = rnd(dim)
        s[f"{b}mlp.linear1.weight"] = rnd(mlp, dim, scale=0.1)
        s[f"{b}mlp.linear1.bias"] = rnd(mlp)
        s[f"{b}mlp.linear2.weight"] = rnd(dim, mlp, scale=0.1)
        s[f"{b}mlp.linear2.bias"] = rnd(dim)
    return s


def m3d_state(variant: str = "phi3", vit_dim: int = 96, dim: int = 64, layers: int = 2, inter: int = 128,
              vocab: int = 32015, seg: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    s = vit_state(VIT, dim=vit_dim, gen=g)
    s.update({
        "model.mm_projector.projector.0.weight": rnd(dim, vit_dim), "model.mm_projector.projector.0.bias": rnd(dim),
        "model.mm_projector.projector.2.weight": rnd(dim, dim), "model.mm_projector.projector.2.bias": rnd(dim),
        "model.embed_tokens.weight": rnd(vocab, dim), "model.norm.weight": 1 + rnd(dim),
        "lm_head.weight": rnd(vocab, dim),
    })
    for i in range(layers):
        p = f"model.layers.{i}."
        if variant == "phi3":
            s[p + "self_attn.qkv_proj.weight"] = rnd(3 * dim, dim)
            s[p + "mlp.gate_up_proj.weight"] = rnd(2 * inter, dim)
        else:
            for n in ("q", "k", "v"):
                s[p + f"self_attn.{n}_proj.weight"] = rnd(dim, dim)
            s[p + "mlp.gate_proj.weight"] = rnd(inter, dim)
            s[p + "mlp.up_proj.weight"] = rnd(inter, dim)
        s[p + "self_attn.o_proj.weight"] = rnd(dim, dim)
        s[p + "mlp.down_proj.weight"] = rnd(dim, inter)
        s[p + "input_layernorm.weight"] = 1 + rnd(dim)
        s[p + "post_attention_layernorm.weight"] = 1 + rnd(dim)
    if seg:  # a few of SegVol's keys (the real module has hundreds) and the [SEG] projector
        s.update({
            "model.seg_module.image_encoder.patch_embedding.position_embeddings": rnd(1, 2048, 8),
            "model.seg_module.image_encoder.blocks.0.attn.qkv.weight": rnd(24, 8),
            "model.seg_module.mask_decoder.transformer.layers.0.self_attn.q_proj.weight": rnd(8, 8),
            "model.seg_module.prompt_encoder.point_embeddings.0.weight": rnd(1, 8),
            "model.seg_projector.0.weight": rnd(dim, dim), "model.seg_projector.0.bias": rnd(dim),
            "model.seg_projector.2.weight": rnd(vit_dim, dim), "model.seg_projector.2.bias": rnd(vit_dim),
        })
    return s


def m3d_config(variant: str = "phi3", dim: int = 64, layers: int = 2, heads: int = 4, inter: int = 128,
               vocab: int = 32015, **extra: Any) -> dict[str, Any]:
    """config.json as LamedPhi3Config / LamedConfig.save_pretrained writes it (M3D fields from train.py)."""
    cfg: dict[str, Any] = {
        "architectures": ["LamedPhi3ForCausalLM" if variant == "phi3" else "LamedLlamaForCausalLM"],
        "model_type": "lamed_phi3" if variant == "phi3" else "lamed_llama",
        "hidden_act": "silu", "hidden_size": dim, "intermediate_size": inter, "max_position_embeddings": 4096,
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": heads,
        "rms_norm_eps": 1e-5, "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.40.1", "use_cache": True, "vocab_size": vocab,
        "bos_token_id": 1, "attention_dropout": 0.0,
        # M3D's own fields (initialize_vision_modules / initialize_seg_modules / train.py main)
        "image_channel": 1, "image_size": [32, 256, 256], "patch_size": [4, 16, 16], "vision_tower": "vit3d",
        "vision_select_layer": -1, "vision_select_feature": "patch", "mm_projector_type": "spp",
        "proj_layer_type": "mlp", "proj_layer_num": 2, "proj_pooling_type": "spatial", "proj_pooling_size": 2,
        "mm_hidden_size": 96, "segmentation_module": "segvol", "seg_token_id": vocab - 1,
    }
    if variant == "phi3":
        cfg.update({"original_max_position_embeddings": 4096, "sliding_window": 2047, "eos_token_id": 32000,
                    "pad_token_id": 32000, "embd_pdrop": 0.0, "resid_pdrop": 0.0})
    cfg.update(extra)
    return cfg


def write_m3d_dir(folder: Path, state: dict[str, torch.Tensor], config: dict[str, Any], shards: int = 3) -> Path:
    """Sharded safetensors in HF's naming, with an index; tensors keep their insertion order per shard."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in part}, str(folder / fname), metadata={"format": "pt"})
        for n in part:
            weight_map[n] = fname
            total += state[n].numel() * state[n].element_size()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture
def make_m3d(tmp_path: Path) -> Callable[..., tuple[Path, dict[str, torch.Tensor]]]:
    """make_m3d(variant="phi3", extra_keys={}, config_overrides={}) -> (folder, source state dict)."""

    def make(variant: str = "phi3", name: str = "m3d", extra_keys: dict[str, torch.Tensor] | None = None,
             shards: int = 3, **config_overrides: Any) -> tuple[Path, dict[str, torch.Tensor]]:
        state = m3d_state(variant)
        state.update(extra_keys or {})
        return write_m3d_dir(tmp_path / name, state, m3d_config(variant, **config_overrides), shards), state

    return make


@pytest.fixture
def vit_bin(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """pretrained_ViT.bin: the bare ViT state dict (no prefix), torch.save'd as M3D distributes it."""
    state = vit_state("", gen=torch.Generator().manual_seed(7))
    path = tmp_path / "pretrained_ViT.bin"
    torch.save(state, path)
    return path, state
