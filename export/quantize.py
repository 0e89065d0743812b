"""Quantized bundles: what each `--precision` word means, and the graph rewrites that make it.

One registry (`SCHEMES`) says, per precision word, what the vision encoder, the decoder's transformer
layers, the lm_head and the embedding table become. The fp32 graphs are exported and verified first
(edgevlm.export.bundle); the words below rewrite them in place inside the temporary bundle folder:

    vision int8   static QDQ (QuantizeLinear/DequantizeLinear around the linear layers but the patch
                  embedding; the attention score matmul Q.K^T int8 with scales taken per call, the weighted
                  sum of values float: see quantize_vision_int8 and int8_attention_scores), int8 weights with one
                  scale per output channel, 8-bit activations with ranges from a calibration set
                  (edgevlm.calibration). Activations are asymmetric uint8 by default: GELU outputs are
                  nearly one-signed, and symmetric int8 spends half its codes on values that never
                  occur (tiny test ViT, 4 held-out volumes: visual-token cosine 0.97 symmetric vs 0.994
                  asymmetric); u8s8 is also MLAS's fast path on x86. `activation_symmetric=True`
                  (`--symmetric-activations`) writes zero-point-0 int8 activations, the only int8 QDQ that
                  TensorRT builds.
    decoder int4  block-wise weight-only com.microsoft MatMulNBits (4 bits, block_size 32 by default,
                  RTN, HQQ (data-free) or GPTQ (data-aware: each weight block's rounding error is
                  compensated in the weights not yet quantized, by the inverse Hessian of the layer's
                  calibration inputs, `edgevlm.calibration.decoder_feeds`), accuracy_level 4 = int8
                  activations inside the kernel on CPU).
    decoder int8  "nbits": MatMulNBits with 8 bits (weight-only, same kernel family as int4), or
                  "dynamic": onnxruntime quantize_dynamic (MatMulInteger, per-channel weights, activations
                  quantized per call). `QuantConfig.int8_decoder` picks; benchmarks/quantize.py measures both.
    lm_head       the decoder graph's last Gemm, rewritten to a MatMul so the same quantizers reach it; its
                  precision is a separate field because it sees every token and its error lands directly
                  on the logits (measured in benchmarks/results/quantize-demo.json: lm_head_sensitivity).
    embeddings    the table in embeddings.safetensors is gathered row by row by the runtime (one row per
                  token, never a matmul), so quantizing it saves disk and RAM but no time; it stays fp16
                  (half the fp32 bytes, an error far below any int8/int4 weight error).

`auto` (edgevlm.export.sensitivity): int4 layers, with the most sensitive groups promoted to int8 until
the accuracy gate holds; the chosen mix is recorded in the manifest.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgevlm.errors import EdgeVLMError

QUANT_VERSION = 1
INT4_METHODS = ("rtn", "hqq", "gptq")
INT8_DECODER_MODES = ("nbits", "dynamic")
INT8_ATTENTION_MODES = ("auto", "dynamic", "float")
LM_HEAD = "decoder.lm_head"


@dataclass(frozen=True)
class Scheme:
    """What one --precision word does to each part of the bundle."""

    vision: str  # fp32 | fp16 | int8
    layers: str  # decoder transformer-layer linears: fp32 | fp16 | int8 | int4 | auto
    lm_head: str  # fp32 | fp16 | int8 | int4
    embeddings: str  # fp32 | fp16 (storage of embeddings.safetensors)
    min_f1_retention: float | None  # task gate: finding F1 >= this x fp32's on the same studies
    summary: str


SCHEMES: dict[str, Scheme] = {
    "fp32": Scheme("fp32", "fp32", "fp32", "fp32", None, "reference; parity gate only"),
    "fp16": Scheme("fp16", "fp16", "fp16", "fp16", None, "whole model fp16 (GPU); parity gate only"),
    "int8": Scheme("int8", "int8", "int8", "fp16", 0.99, "int8 QDQ vision + int8 decoder"),
    "int4": Scheme("int8", "int4", "int8", "fp16", 0.98, "int8 QDQ vision + int4 decoder layers, int8 lm_head"),
    "auto": Scheme("int8", "auto", "int8", "fp16", 0.98,
                   "int8 QDQ vision + int4 layers, most sensitive groups int8 until the int4 gate holds"),
}
QUANTIZED = tuple(k for k, s in SCHEMES.items() if s.vision == "int8")


@dataclass
class QuantConfig:
    """Options of a quantized export; serialized into the manifest (`quantization.config`)."""

    calib: str = "synthetic:32"  # synthetic:N or a folder of studies
    calib_method: str = "minmax"  # minmax | percentile | entropy (edgevlm.calibration.observers)
    activation_symmetric: bool = False  # True: int8 activations with zero point 0 (TensorRT); False: uint8
    int4_block_size: int = 32
    int4_method: str = "rtn"  # rtn | hqq | gptq (data-aware: needs decoder calibration feeds)
    int4_symmetric: bool = False  # zero points per block (asymmetric) keep more accuracy at int4
    int8_decoder: str = "nbits"  # nbits | dynamic
    # vision Q.K^T: dynamic (int8, scales per call: onnxruntime's CPU kernels) | float | auto (export_bundle:
    # dynamic for --device cpu, float for cuda, where those ops would fall back to the CPU)
    int8_attention: str = "auto"
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (fastest on CPU), 0 = fp32
    gate_studies: str = "synthetic:16"  # held-out studies for the task gate (seeds from GATE_SEED_START)
    gate_max_new_tokens: int | None = None  # None: the model's prompt default
    allow_degradation: bool = False
    version: int = QUANT_VERSION

    def __post_init__(self) -> None:
        from edgevlm.calibration import check_method

        check_method(self.calib_method)
        if self.int4_method not in INT4_METHODS:
            raise EdgeVLMError(f"--int4-method must be one of {', '.join(INT4_METHODS)}, got {self.int4_method!r}")
        if self.int8_decoder not in INT8_DECODER_MODES:
            raise EdgeVLMError(f"int8_decoder must be one of {', '.join(INT8_DECODER_MODES)}")
        if self.int8_attention not in INT8_ATTENTION_MODES:
            raise EdgeVLMError(f"--int8-attention must be one of {', '.join(INT8_ATTENTION_MODES)}, "
                               f"got {self.int8_attention!r}")
        if self.int4_block_size < 16 or self.int4_block_size & (self.int4_block_size - 1):
            raise EdgeVLMError(f"--int4-block-size must be a power of two >= 16, got {self.int4_block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise EdgeVLMError(f"accuracy_level must be 0..4, got {self.accuracy_level}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quiet_ort_logging() -> None:
    # onnxruntime.quantization configures the root logger at INFO and logs a line per node.
    for name in ("root", "onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer"):
        logging.getLogger(None if name == "root" else name).setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------ graph helpers


def module_of(node: Any) -> str:
    """The torch module path a dynamo-exported node came from ("decoder.layers.0.mlp.up_proj"), or ""."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in ast.literal_eval(prop.value) if s]
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


def gemm_to_matmul(model: Any) -> None:
    """Gemm(A, B, transB=1) with a constant B (the lm_head) -> MatMul(A, B^T) [+ Add(C)], in place.

    onnxruntime's weight quantizers only rewrite MatMul; the exporter emits the lm_head (2-D input) as Gemm.
    """
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.input[1] not in inits or not plain:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T  # (N, K) -> (K, N): MatMul's layout
        name = f"{node.input[1]}_kn"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
        has_bias = len(node.input) > 2 and node.input[2]
        out = f"{node.output[0]}_mm" if has_bias else node.output[0]
        mm = onnx.helper.make_node("MatMul", [node.input[0], name], [out], name=node.name)
        mm.metadata_props.extend(node.metadata_props)
        nodes.append(mm)
        if has_bias:
            nodes.append(onnx.helper.make_node("Add", [out, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def linear_nodes(model: Any) -> dict[str, str]:
    """{node name: module path} for every MatMul with a constant weight (the model's nn.Linear layers)."""
    inits = {i.name for i in model.graph.initializer}
    return {n.name: module_of(n) for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}


def layer_group(module: str) -> str:
    """Sensitivity group of a linear: "layers.{i}.attn", "layers.{i}.mlp" or "lm_head"."""
    if module == LM_HEAD:
        return "lm_head"
    parts = module.split(".")
    if len(parts) >= 4 and parts[1] == "layers":
        return f"layers.{parts[2]}.{'attn' if parts[3] == 'self_attn' else 'mlp'}"
    return module


def default_plan(model: Any, scheme: Scheme) -> dict[str, str]:
    """{node name: precision} for every decoder linear under `scheme` (auto starts from int4)."""
    layers = "int4" if scheme.layers == "auto" else scheme.layers
    return {name: scheme.lm_head if module == LM_HEAD else layers for name, module in linear_nodes(model).items()}


def _set_accuracy_level(model: Any, level: int) -> None:
    import onnx

    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])


def _nbits(model: Any, include: set[str], bits: int, cfg: QuantConfig,
           feeds: list[dict[str, np.ndarray]] | None = None) -> Any:
    """MatMulNBits for the MatMul nodes in `include` (all others untouched); returns the new ModelProto.
    `feeds`: prefill inputs of the graph (`edgevlm.calibration.decoder_feeds`), for GPTQ."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if not include:
        return model
    if bits == 4 and cfg.int4_method == "gptq":
        return _gptq_int4(model, include, cfg, feeds)
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in include]
    # HQQ: block-wise zero points and scales fitted by half-quadratic optimisation (no data needed). 8-bit
    # and RTN take the plain round-to-nearest path (HQQ is aimed at low bit widths; not measured at 8).
    if bits == 4 and cfg.int4_method == "hqq":
        algo: Any = HQQWeightOnlyQuantConfig(block_size=cfg.int4_block_size, bits=4)
    else:
        symmetric = cfg.int4_symmetric or bits == 8  # 8 bits: 256 levels leave a zero point little to win
        algo = DefaultWeightOnlyQuantConfig(block_size=cfg.int4_block_size, is_symmetric=symmetric,
                                            accuracy_level=cfg.accuracy_level, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=cfg.int4_block_size, nodes_to_exclude=exclude,
                                     algo_config=algo)
    quantizer.process()
    return quantizer.model.model


def _gptq_int4(model: Any, include: set[str], cfg: QuantConfig, feeds: list[dict[str, np.ndarray]] | None) -> Any:
    """GPTQ int4 (onnxruntime's port of Intel Neural Compressor) for the MatMuls in `include`.

    Called directly rather than through MatMulNBitsQuantizer, whose GPTQ path ignores nodes_to_exclude:
    here every other MatMul is marked "fp32", so `auto`'s mixes and the int8 lm_head stay as planned.
    Per-group (block) scales as RTN, column blocks of 128, 1% dampening of the Hessian diagonal, no
    activation reordering (the reordered variant needs a permuted kernel that MatMulNBits lacks)."""
    from onnxruntime.quantization.neural_compressor import gptq_quantize

    if not feeds:
        raise EdgeVLMError("--int4-method gptq needs calibration inputs for the decoder (none were given)")
    scheme = "sym" if cfg.int4_symmetric else "asym"
    weight_config: dict[str, Any] = {
        n.name: ({"bits": 4, "group_size": cfg.int4_block_size, "scheme": scheme, "algorithm": "GPTQ"}
                 if n.name in include else "fp32")
        for n in model.graph.node if n.op_type == "MatMul"}
    quantized = gptq_quantize(model, dataloader=((feed, None) for feed in feeds), weight_config=weight_config,
                              num_bits=4, group_size=cfg.int4_block_size, scheme=scheme, n_samples=-1,
                              percdamp=0.01, blocksize=128, actorder=False, mse=False, perchannel=True,
                              accuracy_level=cfg.accuracy_level)
    return quantized.model


def _dynamic_int8(model: Any, include: set[str]) -> Any:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not include:
        return model
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, str(src))
        quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], nodes_to_quantize=sorted(include))
        return onnx.load(str(dst))


def quantize_decoder(src: Path, dst: Path, plan: dict[str, str], cfg: QuantConfig,
                     feeds: list[dict[str, np.ndarray]] | None = None) -> dict[str, int]:
    """Rewrite decoder.onnx per `plan` ({node name: fp32|int8|int4}); returns {precision: node count}.
    `feeds`: the decoder's calibration inputs, for data-aware int4 (`cfg.int4_method == "gptq"`)."""
    import onnx

    _quiet_ort_logging()
    model = onnx.load(str(src))
    gemm_to_matmul(model)
    unknown = sorted(set(plan) - set(linear_nodes(model)))
    if unknown:
        raise EdgeVLMError(f"quantization plan names nodes the decoder graph lacks: {', '.join(unknown[:3])}")
    model = _nbits(model, {n for n, p in plan.items() if p == "int4"}, 4, cfg, feeds)
    int8 = {n for n, p in plan.items() if p == "int8"}
    model = _nbits(model, int8, 8, cfg) if cfg.int8_decoder == "nbits" else _dynamic_int8(model, int8)
    _set_accuracy_level(model, cfg.accuracy_level)
    onnx.save(model, str(dst))
    counts: dict[str, int] = {}
    for p in plan.values():
        counts[p] = counts.get(p, 0) + 1
    return counts


def vision_int8_nodes(model: Any) -> list[str]:
    """The vision graph's MatMuls that int8 covers: the encoder blocks' linear layers (not the patch
    embedding, not the projector: see `quantize_vision_int8`)."""
    return sorted(name for name, module in linear_nodes(model).items()
                  if not module.endswith("patch_embed") and "projector" not in module.split("."))


def quantize_vision_int8(src: Path, dst: Path, volumes: np.ndarray, cfg: QuantConfig,
                         on_volume: Any = None, nodes: list[str] | None = None) -> None:
    """Static QDQ int8 of vision.onnx: per-channel int8 weights, activations calibrated on `volumes`.

    Quantized: the encoder blocks' linear layers (`vision_int8_nodes`; `nodes` names another set, for
    measuring). Kept in float, measured on the trained demo teacher (min token cosine vs fp32 over 8 held-out
    studies): the patch embedding, whose output is a small study-specific signal on top of a large mean-anatomy
    term the position table cancels; int8 weights break that cancellation (0.884 with it quantized, 0.989
    without). And, statically, the attention matmuls (scores, weighted values): activation x activation with
    per-head, per-study ranges a static per-tensor scale fits badly (0.838 -> 0.884 when left in float). The
    scores are made int8 afterwards with scales taken per call (`int8_attention_scores`, cfg.int8_attention ==
    "dynamic"). And the projector: its output is what the decoder reads for every visual token, and an spp
    projector runs on the pooled tokens (64 of the demo's 512, 256 of M3D-LaMed's 2,048), so int8 there saves
    almost no time (1.2% of the M3D-shaped encoder's multiply-adds). Measured on the stage-3 demo teacher, 64
    studies disjoint from calibration and gate studies: mean relative visual-token error vs fp32 0.0162 with
    the projector at int8, 0.0077 in float. On the 200 gate studies the int8 vision graph alone keeps 100.2%
    of fp32's finding F1 with the projector in float and 98.6% with it at int8 (2 true positives lost, 2 false
    positives added); the whole int8 word 99.3% against 98.1%, across the 99% gate
    (benchmarks/quantize_parts.py).
    """
    import onnx
    from edgevlm.calibration import calibration_methods, volume_reader
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    _quiet_ort_logging()
    if nodes is None:
        nodes = vision_int8_nodes(onnx.load(str(src), load_external_data=False))
    with tempfile.TemporaryDirectory() as tmp:
        quantize_static(
            str(src), str(Path(tmp) / "vision.onnx"), volume_reader(volumes, on_volume=on_volume),
            quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8 if cfg.activation_symmetric else QuantType.QUInt8,
            calibrate_method=calibration_methods()[cfg.calib_method], op_types_to_quantize=["MatMul"],
            nodes_to_quantize=nodes,
            # Q/DQ on the inputs only (as TensorRT places them): onnxruntime then runs each linear as one
            # MatMulIntegerToFloat instead of QLinearMatMul + an output DequantizeLinear (M3D-shaped
            # encoder, fused attention: 1,130 vs 1,240 ms; one rounding fewer per layer).
            extra_options={"ActivationSymmetric": cfg.activation_symmetric, "WeightSymmetric": True,
                           "OpTypesToExcludeOutputQuantization": ["MatMul"]},
        )
        if cfg.int8_attention == "dynamic":  # `auto` is resolved per device first (resolve_int8_attention)
            model = onnx.load(str(Path(tmp) / "vision.onnx"))
            int8_attention_scores(model)
            onnx.save(model, str(Path(tmp) / "vision.onnx"))
        shutil.move(str(Path(tmp) / "vision.onnx"), str(dst))


def attention_score_matmuls(model: Any) -> list[Any]:
    """MatMul nodes of a graph that compute attention scores: both operands activations (no initializer,
    no dequantized weight), the product reaching a Softmax through elementwise scale/mask ops only."""
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def is_activation(name: str) -> bool:
        node = producer.get(name)
        if name in constants or (node is not None and node.op_type == "Constant"):
            return False
        return node is None or not (node.op_type == "DequantizeLinear" and node.input[0] in constants)

    def reaches_softmax(name: str, hops: int) -> bool:
        for node in consumers.get(name, []):
            if node.op_type == "Softmax":
                return True
            elementwise = node.op_type in ("Mul", "Div", "Add", "Where", "Cast")
            if hops and elementwise and reaches_softmax(node.output[0], hops - 1):
                return True
        return False

    return [node for node in graph.node if node.op_type == "MatMul" and all(map(is_activation, node.input))
            and reaches_softmax(node.output[0], 3)]


def int8_attention_scores(model: Any) -> int:
    """Rewrite each attention score MatMul Q.K^T to int8 with scales taken per call; returns the count.

    Q: DynamicQuantizeLinear (uint8, per-tensor scale and zero point from this call's min/max); K^T:
    symmetric int8 at max|K| / 127; MatMulInteger, then the int32 product times both scales. Scales per
    call, not calibrated: a static per-tensor scale fitted the per-head, per-study ranges badly (see
    quantize_vision_int8). uint8 x int8 is the VNNI kernel of onnxruntime's MLAS, which fuses the chain
    into DynamicQuantizeMatMul; measured on the M3D-shaped ViT (2,049 tokens, 12 heads, 2 threads): the
    score matmuls 270 -> 195 ms of the 1 s int8 encoder, token cosine to fp32 unchanged (0.9972).
    uint8 x uint8 (DynamicQuantizeLinear on both sides) was no faster than float. The weighted sum of
    values stays float: softmax outputs over ~2k keys are mostly below one uint8 step of a per-tensor
    scale. ONNX Runtime only; TensorRT builds QDQ int8 graphs (`--int8-attention float`).
    """
    from onnx import TensorProto, helper, numpy_helper

    targets = {node.output[0] for node in attention_score_matmuls(model)}  # SSA: outputs name nodes
    if not targets:
        return 0
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(np.array(1 / 127, np.float32), "attn_int8_inv127"),
                              numpy_helper.from_array(np.array(0, np.int8), "attn_int8_zero")])
    rewritten: list[Any] = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.output[0] not in targets:
            rewritten.append(node)
            continue
        q, k_t = node.input
        p = f"{node.name or node.output[0]}_int8"
        rewritten += [
            helper.make_node("DynamicQuantizeLinear", [q], [f"{p}_q", f"{p}_q_scale", f"{p}_q_zero"]),
            helper.make_node("Abs", [k_t], [f"{p}_k_abs"]),
            helper.make_node("ReduceMax", [f"{p}_k_abs"], [f"{p}_k_max"], keepdims=0),
            helper.make_node("Mul", [f"{p}_k_max", "attn_int8_inv127"], [f"{p}_k_scale"]),
            helper.make_node("QuantizeLinear", [k_t, f"{p}_k_scale", "attn_int8_zero"], [f"{p}_k"]),
            helper.make_node("MatMulInteger", [f"{p}_q", f"{p}_k", f"{p}_q_zero"], [f"{p}_i32"]),
            helper.make_node("Cast", [f"{p}_i32"], [f"{p}_f32"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}_q_scale", f"{p}_k_scale"], [f"{p}_scale"]),
            helper.make_node("Mul", [f"{p}_f32", f"{p}_scale"], list(node.output), name=node.name),
        ]
    del graph.node[:]
    graph.node.extend(rewritten)
    return len(targets)


def resolve_int8_attention(cfg: QuantConfig, device: str, fused_attention: bool = False) -> QuantConfig:
    """`auto` -> dynamic int8 scores on the CPU, float on CUDA or where the vision attention is fused
    (edgevlm.export.fuse: the fused float op beats int8 scores on the CPU, M3D-shaped encoder 2,715 vs
    3,342 ms under the same load); an explicit choice is kept."""
    if cfg.int8_attention != "auto":
        return cfg
    return replace(cfg, int8_attention="dynamic" if device == "cpu" and not fused_attention else "float")


def graph_weight_bytes(path: Path, modules: dict[str, str] | None = None) -> dict[str, int]:
    """Bytes of constant weights in a graph: transformer layers, lm_head and the rest.

    Quantizers drop the exporter's module metadata on the nodes they write; `modules` ({fp32 node name:
    module}, from `linear_nodes` before quantizing) names them through their name prefix.
    """
    import onnx

    model = onnx.load(str(path))
    sizes = {i.name: len(i.raw_data) if i.raw_data else onnx.numpy_helper.to_array(i).nbytes
             for i in model.graph.initializer}
    by_prefix = sorted((modules or {}).items(), key=lambda kv: -len(kv[0]))
    out = {"layers": 0, "lm_head": 0, "other": 0}
    counted: set[str] = set()
    for node in model.graph.node:
        module = module_of(node) or next((m for n, m in by_prefix if node.name.startswith(n)), "")
        part = "lm_head" if module == LM_HEAD else "layers" if module.startswith("decoder.layers.") else "other"
        for name in node.input:
            if name in sizes and name not in counted:
                counted.add(name)
                out[part] += sizes[name]
    out["other"] += sum(v for k, v in sizes.items() if k not in counted)
    return out
