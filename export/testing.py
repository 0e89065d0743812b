"""Small random-weight models with a real tokenizer, for tests and demos of export and runtime.

Random weights at std 0.02 give near-uniform logits, where greedy decoding is decided by ties of
1e-4 and parity would measure noise; `make_checkpoint` scales the output head so the logits spread
over a few units, like a trained model's.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch

from edgevlm.models import DecoderConfig, MedVLM, MedVLMConfig, ProjectorConfig, PromptConfig, VisionConfig

CORPUS = (
    "No pleural effusion. The lungs are clear. Heart size is normal.",
    "A 12 mm solid nodule in the right upper lobe. Small left pleural effusion.",
    "Consolidation in the left lower lobe. No pneumothorax. Mild emphysema.",
    "Write the radiology report for this CT. Is there a pleural effusion? Describe the lungs.",
    "Where is the largest nodule? Yes. No. Right. Left. Upper. Lower. Middle.",
)


@lru_cache(maxsize=1)
def tokenizer_json(vocab_size: int = 320) -> str:
    from edgevlm.models.tokenizer import train_tokenizer

    return train_tokenizer(list(CORPUS) * 10, vocab_size).to_str()


def tiny_config(variant: str = "gqa") -> MedVLMConfig:
    """A model small enough to export and check in seconds; `variant` switches decoder/vision features.

    gqa: grouped-query attention (4 heads, 2 kv), CLS on, spp projector, learned positions.
    fused: Phi-3 fused qkv / gate_up, multi-head attention, qkv bias (Qwen2), CLS off, a visual position
        table after the projector; 1 layer.
    tied: tied embeddings, factorized positions, mlp projector, one kv head (MQA), CLS on; 1 layer.
    """
    from edgevlm.preprocess import RECIPES

    vision = VisionConfig(image_size=(8, 16, 16), patch_size=(2, 4, 4), dim=32, depth=2, heads=2, mlp_dim=64)
    decoder = DecoderConfig(vocab_size=320, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                            max_seq_len=128)
    projector = ProjectorConfig(kind="spp", pool=(2, 2, 2))
    # One layer each in the other variants: export time grows with the traced op count.
    if variant == "fused":
        vision = replace(vision, cls_token=False, qkv_bias=True, depth=1)
        decoder = replace(decoder, n_kv_heads=4, fused_qkv=True, fused_gate_up=True, qkv_bias=True, n_layers=1)
        projector = replace(projector, pos_embed=True)
    elif variant == "tied":
        vision = replace(vision, pos_embed="factorized", image_size=(4, 8, 8), depth=1)
        decoder = replace(decoder, n_kv_heads=1, tie_embeddings=True, n_layers=1)
        projector = ProjectorConfig(kind="mlp")
    elif variant != "gqa":
        raise ValueError(f"unknown tiny variant {variant!r}")
    recipe = replace(RECIPES["demo-chest"], name=f"tiny-{variant}", grid=vision.image_size, spacing_mm=None,
                     fit="resize")
    return MedVLMConfig(name=f"tiny-{variant}", vision=vision, projector=projector, decoder=decoder,
                        prompt=PromptConfig(max_new_tokens=10), preprocess=recipe.to_dict())


def make_checkpoint(path: str | Path, cfg: MedVLMConfig, seed: int = 0) -> Path:
    """A random-weight native checkpoint with the test tokenizer, written to `path`."""
    from edgevlm.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = MedVLM(cfg)
    with torch.no_grad():  # spread the logits (see the module docstring)
        if cfg.decoder.tie_embeddings:
            model.decoder.embed_tokens.weight.mul_(25.0)
        else:
            model.decoder.lm_head.weight.mul_(25.0)
        if model.projector.pos_embed is not None:  # zero at init: make it count in the graphs
            torch.nn.init.normal_(model.projector.pos_embed)
    return save_checkpoint(model, path, tokenizer_json=tokenizer_json(cfg.decoder.vocab_size))


_BUNDLES: dict[tuple[str, str, str], tuple[Path, Path]] = {}


def tiny_bundle(base_dir: str | Path, variant: str = "gqa", precision: str = "fp32") -> tuple[Path, Path]:
    """(checkpoint, bundle) for a tiny variant, exported once per process and base folder.

    Callers must not modify the returned bundle (copy it first): other tests share it.
    """
    from edgevlm.export.bundle import export_bundle

    key = (str(base_dir), variant, precision)
    if key not in _BUNDLES:
        base = Path(base_dir)
        base.mkdir(parents=True, exist_ok=True)
        ckpt = base / f"{variant}.safetensors"
        if not ckpt.exists():
            make_checkpoint(ckpt, tiny_config(variant))
        bundle = export_bundle(ckpt, base / f"{variant}-{precision}", precision=precision, overwrite=True)
        _BUNDLES[key] = (ckpt, bundle)
    return _BUNDLES[key]
