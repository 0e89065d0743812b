"""The canonical 3D-MedVLM family: VisionEncoder3D -> Projector -> Decoder (DESIGN.md decision 1)."""

from edgevlm.models.config import (
    PRESETS,
    DecoderConfig,
    MedVLMConfig,
    ProjectorConfig,
    PromptConfig,
    VisionConfig,
)
from edgevlm.models.decoder import Decoder, KVCache, setup_cache
from edgevlm.models.medvlm import GenerationConfig, MedVLM, sample
from edgevlm.models.projector import Projector
from edgevlm.models.vision import VisionEncoder3D, conv3d_to_linear_weight, patchify

__all__ = [
    "PRESETS",
    "Decoder",
    "DecoderConfig",
    "GenerationConfig",
    "KVCache",
    "MedVLM",
    "MedVLMConfig",
    "Projector",
    "ProjectorConfig",
    "PromptConfig",
    "VisionConfig",
    "VisionEncoder3D",
    "conv3d_to_linear_weight",
    "patchify",
    "sample",
    "setup_cache",
]
