"""edgevlm.export: a checkpoint -> a verified ONNX bundle (vision, decoder with static KV cache,
embeddings, tokenizer, preprocessing recipe, manifest with sha256, versions and parity)."""

from edgevlm.export.bundle import DEFAULT_OPSET, EXPORTER, PRECISIONS, ExportOptions, export_bundle, resolve_recipe
from edgevlm.export.graphs import DecoderStep, VisionGraph, cache_names
from edgevlm.export.parity import THRESHOLDS, ParityConfig, ParityThresholds, measure_parity

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTER",
    "PRECISIONS",
    "THRESHOLDS",
    "DecoderStep",
    "ExportOptions",
    "ParityConfig",
    "ParityThresholds",
    "VisionGraph",
    "cache_names",
    "export_bundle",
    "measure_parity",
    "resolve_recipe",
]
