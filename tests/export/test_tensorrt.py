"""edgevlm.export.tensorrt: the static TensorRT operator check, on real exported and rewritten graphs
(TensorRT itself cannot be installed here; tests/cli/test_infer.py mocks its provider for the warning)."""

from __future__ import annotations

import json

import onnx
import torch
from edgevlm.export import bundle as bundle_module
from edgevlm.export.fuse import fuse_attention
from edgevlm.export.quantize import int8_attention_scores
from edgevlm.export.tensorrt import tensorrt_fallbacks, tensorrt_warning
from edgevlm.export.testing import tiny_config

from edgevlm.models import MedVLM


def test_plain_fused_and_int8_score_graphs_are_told_apart(tmp_path) -> None:
    cfg = tiny_config("gqa")
    path = tmp_path / "vision.onnx"
    with torch.no_grad():
        bundle_module.export_vision(MedVLM(cfg).eval(), path, 18, "cpu", torch.float32)
    plain = onnx.load(str(path))
    assert tensorrt_fallbacks(plain) == {}
    fused = onnx.load(str(path))
    fuse_attention(fused, cfg.vision.heads)
    assert tensorrt_fallbacks(fused) == {"com.microsoft::MultiHeadAttention": cfg.vision.depth}
    scores = onnx.load(str(path))
    assert int8_attention_scores(scores) == cfg.vision.depth
    assert tensorrt_fallbacks(scores) == {"DynamicQuantizeLinear": cfg.vision.depth,
                                          "MatMulInteger": cfg.vision.depth}


def test_manifest_records_the_check(gqa_bundle) -> None:
    _, bundle = gqa_bundle
    record = json.loads((bundle / "manifest.json").read_text())["tensorrt"]
    assert record["graphs"]["decoder.onnx"] == {"whole_graph": True, "fallback_ops": {}}  # fp32 decoder
    assert record["graphs"]["vision.onnx"]["fallback_ops"] == {"com.microsoft::MultiHeadAttention": 2}
    warning = tensorrt_warning(record)
    assert "vision.onnx: com.microsoft::MultiHeadAttention x2" in warning and "--device cuda" in warning
    assert tensorrt_warning({"graphs": {"vision.onnx": {"whole_graph": True, "fallback_ops": {}}}}) is None
