from __future__ import annotations

import pytest

from edgevlm.models import DecoderConfig, MedVLMConfig, ProjectorConfig, PromptConfig, VisionConfig


@pytest.fixture
def tiny_cfg() -> MedVLMConfig:
    """A model small enough for many forwards in a test, with every feature switched on."""
    return MedVLMConfig(
        name="tiny",
        vision=VisionConfig(image_size=(8, 16, 16), patch_size=(2, 4, 4), dim=32, depth=2, heads=2, mlp_dim=64),
        projector=ProjectorConfig(kind="spp", pool=(2, 2, 2)),
        decoder=DecoderConfig(vocab_size=97, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                              max_seq_len=128),
        prompt=PromptConfig(max_new_tokens=12),
    )
