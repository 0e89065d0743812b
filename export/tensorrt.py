"""Would TensorRT take a bundle's graphs whole? A static operator check, recorded in the manifest.

TensorRT cannot be installed on the machines edgevlm is built on (its wheels download from a host they
cannot reach) and is not on the lent GPU image either, so edgevlm builds no engine itself: onnxruntime's
TensorRT execution provider does, where it is installed, and hands TensorRT each subgraph its ONNX
parser takes; every other node falls back to the CUDA (or CPU) provider, with copies between them. This
check says, per graph, which nodes would fall back: those outside the standard ONNX domain (onnxruntime
contrib ops such as MultiHeadAttention, MatMulNBits, MatMulIntegerToFloat) and the standard integer ops
the parser does not implement (it reads int8 only as QuantizeLinear/DequantizeLinear pairs). The lists
follow onnx-tensorrt's operator table; they are not verified against a real TensorRT here.

For a TensorRT-whole vision graph export with `--device cuda` (or `--fused-attention off`, and
`--int8-attention float` for int8); quantized decoders are com.microsoft MatMulNBits in every case.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

STANDARD_DOMAINS = ("", "ai.onnx")
# Standard-domain ops onnx-tensorrt does not parse: integer arithmetic outside the Q/DQ form.
NOT_PARSED = frozenset({"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QLinearMatMul", "QLinearConv"})


def tensorrt_fallbacks(graph: Any) -> dict[str, int]:
    """{op (domain::op for non-standard domains): count} of the nodes TensorRT's parser would not take."""
    counts: Counter[str] = Counter()
    for node in graph.graph.node:
        if node.domain not in STANDARD_DOMAINS:
            counts[f"{node.domain}::{node.op_type}"] += 1
        elif node.op_type in NOT_PARSED:
            counts[node.op_type] += 1
    return dict(sorted(counts.items()))


def tensorrt_record(files: dict[str, Path]) -> dict[str, Any]:
    """The manifest's `tensorrt` entry for the bundle's graphs ({name: path})."""
    import onnx

    graphs = {}
    for name, path in files.items():
        fallbacks = tensorrt_fallbacks(onnx.load(str(path), load_external_data=False))
        graphs[name] = {"whole_graph": not fallbacks, "fallback_ops": fallbacks}
    return {"graphs": graphs, "checked": "static operator check (edgevlm.export.tensorrt); TensorRT itself "
                                         "was not run"}


def tensorrt_warning(record: dict[str, Any] | None) -> str | None:
    """One line for a session about to use the TensorRT provider on graphs it cannot take whole."""
    if not record:
        return None
    parts = [f"{name}: {', '.join(f'{op} x{n}' for op, n in g['fallback_ops'].items())}"
             for name, g in record["graphs"].items() if not g["whole_graph"]]
    if not parts:
        return None
    return (f"TensorRT will not take these nodes, they run on the next provider ({'; '.join(parts)}); "
            "for a TensorRT-whole vision graph export with --device cuda (or --fused-attention off "
            "--int8-attention float)")
