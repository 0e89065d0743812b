"""Fused attention for onnxruntime: the vision graph's attention as one com.microsoft.MultiHeadAttention.

The dynamo exporter writes `F.scaled_dot_product_attention` as MatMul(q * s, k^T * s) -> Softmax ->
MatMul(., v): the (heads, N, N) score tensor is materialized, written and read three times. At the
M3D-LaMed grid (2,049 tokens, 12 heads) that is 200 MB per layer, and the encoder's attention runs at
memory speed. onnxruntime's MultiHeadAttention (CPU: a tiled, flash-style kernel; CUDA: flash /
memory-efficient attention) never materializes it: measured on one 2,049-token layer, 2 threads, fp32,
52 ms against 75-81 ms unfused (benchmarks/quantize.py has the whole-encoder numbers).

Only unmasked attention is fused (dense ViT blocks); a masked Softmax input (sparse3d's block mask) is
left as exported. The rewrite is onnxruntime-only: a contrib op, so a graph meant for TensorRT's own
parser keeps the plain form (`ExportOptions.fused_attention`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

FUSED_ATTENTION_MODES = ("auto", "on", "off")  # auto: on for onnxruntime CPU exports, off for CUDA (TensorRT)
_LAYOUT_OPS = ("Reshape", "Transpose")


def resolve_fused_attention(mode: str, device: str, int8_attention: str = "auto") -> bool:
    """Whether vision.onnx gets fused attention. `auto`: yes for --device cpu, unless int8 attention
    scores were asked for (`--int8-attention dynamic`: a rewrite of the plain score MatMuls, which the
    fused op has no int8 form of); on CUDA the graph stays plain for TensorRT's parser."""
    from edgevlm.errors import EdgeVLMError

    if mode not in FUSED_ATTENTION_MODES:
        raise EdgeVLMError(f"--fused-attention must be one of {', '.join(FUSED_ATTENTION_MODES)}, got {mode!r}")
    if mode == "on" and int8_attention == "dynamic":
        raise EdgeVLMError("--fused-attention on and --int8-attention dynamic exclude each other: int8 scores "
                           "rewrite the plain attention graph; choose one")
    return mode == "on" or (mode == "auto" and device == "cpu" and int8_attention != "dynamic")


def _scalar(initializers: dict[str, Any], name: str, producer: dict[str, Any]) -> float | None:
    from onnx import numpy_helper

    node = producer.get(name)
    if name in initializers:
        value = numpy_helper.to_array(initializers[name])
    elif node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
        value = numpy_helper.to_array(node.attribute[0].t)
    else:
        return None
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _scaled_operand(initializers: dict[str, Any], name: str, producer: dict[str, Any]) -> tuple[str, float] | None:
    """(tensor, s) for `name` = Mul(tensor, s) with a scalar constant s, (name, 1.0) when `name` is no Mul,
    None for a Mul by a non-constant."""
    node = producer.get(name)
    if node is None or node.op_type != "Mul":
        return name, 1.0
    for i in (0, 1):
        s = _scalar(initializers, node.input[1 - i], producer)
        if s is not None:
            return node.input[i], s
    return None


def _shape(value_info: dict[str, Any], name: str) -> list[int | str] | None:
    info = value_info.get(name)
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in info.type.tensor_type.shape.dim]


def _compatible(shape: list[int | str] | None, expected: list[int | str]) -> bool:
    """True when `shape` (the exporter leaves some unnamed: '') contradicts none of `expected`."""
    if shape is None:
        return True
    return len(shape) == len(expected) and all(a in ("", b) for a, b in zip(shape, expected, strict=True))


def fuse_attention(model: Any, num_heads: int) -> int:
    """Rewrite each unmasked softmax(q k^T * scale) v of `model` (in place) into MultiHeadAttention.

    Matched: Softmax(axis=-1) fed by a MatMul of two activations, read by exactly one MatMul(., v), where
    q and v are (B, heads, N, head_dim) and k^T reaches k (same shape as q) through Reshape/Transpose
    nodes only; scalar Muls on q and k^T (the exporter splits the scale as sqrt on each) become the op's
    `scale`. The node's inputs are q, k, v moved to (B, N, heads * head_dim); its output is moved back
    to (B, heads, N, head_dim) for the original consumers (onnxruntime's transpose optimizer then
    cancels the following Transpose). Returns the number of attentions fused; nodes left unused are
    removed. Shapes come from the exporter's value_info: nothing is fused where they are missing. The
    layout chain from k to k^T is matched by its ends' shapes, not proven a transpose: export_bundle's
    parity gate compares the rewritten graph with PyTorch before anything is written.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    value_info = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}
    initializers = {i.name: i for i in graph.initializer}

    replacements: dict[int, list[Any]] = {}  # id(final MatMul) -> nodes that replace it
    for softmax in graph.node:
        if softmax.op_type != "Softmax" or any(a.name == "axis" and a.i not in (-1, 3) for a in softmax.attribute):
            continue
        scores = producer.get(softmax.input[0])
        readers = consumers.get(softmax.output[0], [])
        if scores is None or scores.op_type != "MatMul" or len(readers) != 1 or readers[0].op_type != "MatMul":
            continue
        weighted = readers[0]
        if weighted.input[0] != softmax.output[0] or len(consumers.get(scores.output[0], [])) != 1:
            continue
        q_side, k_side = (_scaled_operand(initializers, name, producer) for name in scores.input)
        if q_side is None or k_side is None:
            continue
        (q, s_q), (k_t, s_k), v = q_side, k_side, weighted.input[1]
        k = k_t
        while k in producer and producer[k].op_type in _LAYOUT_OPS and k not in initializers:
            k = producer[k].input[0]
        k_side = _scaled_operand(initializers, k, producer)  # a scale applied before the transpose
        if k_side is None:
            continue
        k, s_pre = k_side
        s_k *= s_pre
        shape_q, shape_k, shape_kt, shape_v = (_shape(value_info, n) for n in (q, k, k_t, v))
        if (shape_q is None or len(shape_q) != 4 or shape_q[1] != num_heads or shape_k != shape_q
                or not _compatible(shape_kt, [*shape_q[:2], shape_q[3], shape_q[2]])
                or shape_v is None or len(shape_v) != 4 or k == k_t or k in initializers or v in initializers):
            continue
        head_dim = shape_q[3]
        p = f"{weighted.name or weighted.output[0]}_mha"
        nodes = []
        for tensor, tag in ((q, "q"), (k, "k"), (v, "v")):
            nodes += [helper.make_node("Transpose", [tensor], [f"{p}_{tag}_bnsh"], perm=[0, 2, 1, 3]),
                      helper.make_node("Reshape", [f"{p}_{tag}_bnsh", f"{p}_bsd_shape"], [f"{p}_{tag}"])]
        nodes += [
            helper.make_node("MultiHeadAttention", [f"{p}_q", f"{p}_k", f"{p}_v"], [f"{p}_out"], domain="com.microsoft",
                             num_heads=num_heads, scale=float(s_q * s_k), name=p),
            helper.make_node("Reshape", [f"{p}_out", f"{p}_bnsh_shape"], [f"{p}_out_bsnh"]),
            helper.make_node("Transpose", [f"{p}_out_bsnh"], list(weighted.output), perm=[0, 2, 1, 3]),
        ]
        graph.initializer.extend([
            numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{p}_bsd_shape"),
            numpy_helper.from_array(np.array([0, 0, num_heads, head_dim], np.int64), f"{p}_bnsh_shape"),
        ])
        replacements[id(weighted)] = nodes
    if not replacements:
        return 0
    rewritten = []
    for node in graph.node:
        rewritten += replacements.get(id(node), [node])
    del graph.node[:]
    graph.node.extend(rewritten)
    _remove_unused(graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replacements)


def _remove_unused(graph: Any) -> None:
    """Drop nodes (and initializers) no graph output depends on, keeping the order of the rest."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(node.input)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    unused = [i for i in graph.initializer if i.name not in needed]
    for init in unused:
        graph.initializer.remove(init)
