"""edgevlm.export.fuse: the vision attention as onnxruntime's MultiHeadAttention, against PyTorch."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from edgevlm.export.bundle import export_vision
from edgevlm.export.fuse import fuse_attention, resolve_fused_attention
from edgevlm.export.quantize import QuantConfig, resolve_int8_attention
from edgevlm.export.testing import tiny_config

from edgevlm.errors import EdgeVLMError
from edgevlm.models import MedVLM


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("cls_token", [False, True])
def test_fused_vision_graph_matches_pytorch_and_the_plain_graph(tmp_path, cls_token: bool) -> None:
    cfg = tiny_config("gqa")
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, cls_token=cls_token))
    torch.manual_seed(0)
    model = MedVLM(cfg).eval()
    with torch.no_grad():  # non-zero residual branches and peaked scores: a near-uniform softmax hides the scale
        for p in model.vision.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for block in model.vision.blocks:
            block.attn.qkv.weight.normal_(0.0, 0.5)
    plain, fused = tmp_path / "plain.onnx", tmp_path / "fused.onnx"
    with torch.no_grad():
        assert export_vision(model, plain, 18, "cpu", torch.float32) == 0
        assert export_vision(model, fused, 18, "cpu", torch.float32, fused_attention=True) == cfg.vision.depth
    graph = onnx.load(str(fused))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MultiHeadAttention") == cfg.vision.depth and "Softmax" not in ops
    assert "Softmax" in [n.op_type for n in onnx.load(str(plain)).graph.node]
    rng = np.random.default_rng(1)
    for batch in (1, 3):  # the batch axis stays symbolic through the rewrite
        volume = rng.standard_normal((batch, 1, *cfg.vision.image_size)).astype(np.float32)
        with torch.no_grad():
            ref = model.encode_image(torch.from_numpy(volume)).numpy()
        out_fused = _session(fused).run(None, {"volume": volume})[0]
        out_plain = _session(plain).run(None, {"volume": volume})[0]
        assert np.isfinite(out_fused).all()
        np.testing.assert_allclose(out_fused, ref, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(out_fused, out_plain, atol=2e-5, rtol=1e-4)


def _masked_attention_graph() -> onnx.ModelProto:
    """softmax(q k^T * s + mask) v: a masked attention (as sparse3d exports) that must stay unfused."""
    from onnx import TensorProto, helper

    shape = [1, 2, 8, 4]
    inits = [onnx.numpy_helper.from_array(np.array(0.5, np.float32), "s"),
             onnx.numpy_helper.from_array(np.triu(np.full((8, 8), -1e4, np.float32), 1), "mask")]
    nodes = [helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
             helper.make_node("Mul", ["k_t", "s"], ["k_ts"]), helper.make_node("MatMul", ["q", "k_ts"], ["a"]),
             helper.make_node("Add", ["a", "mask"], ["am"]), helper.make_node("Softmax", ["am"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"])]
    graph = helper.make_graph(nodes, "masked", [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)
                                                for x in "qkv"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_masked_attention_is_left_as_exported() -> None:
    model = _masked_attention_graph()
    before = [n.op_type for n in model.graph.node]
    assert fuse_attention(model, num_heads=2) == 0
    assert [n.op_type for n in model.graph.node] == before


def test_fused_attention_modes_resolve_per_device_and_int8_choice() -> None:
    assert resolve_fused_attention("auto", "cpu") is True
    assert resolve_fused_attention("auto", "cuda") is False  # plain graph for TensorRT's parser
    assert resolve_fused_attention("on", "cuda") is True and resolve_fused_attention("off", "cpu") is False
    assert resolve_fused_attention("auto", "cpu", "dynamic") is False  # int8 scores need the plain graph
    with pytest.raises(EdgeVLMError, match="exclude each other"):
        resolve_fused_attention("on", "cpu", "dynamic")
    with pytest.raises(EdgeVLMError, match="--fused-attention"):
        resolve_fused_attention("always", "cpu")
    # fused float attention replaces the int8 score rewrite on the CPU; without fusion it stays dynamic
    assert resolve_int8_attention(QuantConfig(), "cpu", fused_attention=True).int8_attention == "float"
    assert resolve_int8_attention(QuantConfig(), "cpu", fused_attention=False).int8_attention == "dynamic"


def test_scales_before_and_after_the_key_transpose_are_both_kept() -> None:
    """softmax((q*s) (k*s)^T) v with k's scale applied before its transpose: the fused op's scale is s*s."""
    from onnx import TensorProto, helper

    shape = [1, 2, 8, 4]
    s = onnx.numpy_helper.from_array(np.array(0.7, np.float32), "s")
    nodes = [helper.make_node("Mul", ["k", "s"], ["k_s"]),
             helper.make_node("Transpose", ["k_s"], ["k_t"], perm=[0, 1, 3, 2]),
             helper.make_node("Mul", ["q", "s"], ["q_s"]), helper.make_node("MatMul", ["q_s", "k_t"], ["a"]),
             helper.make_node("Softmax", ["a"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["y"])]
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape) for x in "qkv"]
    graph = helper.make_graph(nodes, "scaled", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              [s])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert fuse_attention(model, num_heads=2) == 1
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(shape) for _ in range(3))
    scores = (q * 0.7) @ (k * 0.7).transpose(0, 1, 3, 2)  # float64 reference
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    ref = (weights / weights.sum(-1, keepdims=True)) @ v
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"q": q.astype(np.float32), "k": k.astype(np.float32), "v": v.astype(np.float32)})[0]
    np.testing.assert_allclose(out, ref, atol=1e-5)
