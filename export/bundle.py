"""`export_bundle`: a checkpoint -> a verified ONNX bundle (layout in edgevlm.runtime.bundle).

Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript). It takes the dynamic axes as
`torch.export.Dim` ranges and checks them symbolically: batch, sequence and cache length come out as
named symbolic dims, and an axis that the code specialises raises at export time instead of silently
becoming a constant (the TorchScript exporter is deprecated in torch 2.9+, traces one example and
reports nothing when a size-1 or data-dependent axis is baked in). Example sizes are >= 2 and pairwise
distinct (batch 2, sequence 3, cache 7) so no axis is specialised or unified with another; the parity
step then runs the graphs at batch 1..3, sequence 1 (decode) and prompt lengths, cache lengths never seen
during export.

Atomicity: everything is written into a temporary sibling folder `.NAME.partial-*`, verified, and
renamed onto NAME at the end; any failure (or Ctrl-C) removes the temporary folder, so an interrupted
export leaves no half bundle and an existing bundle is only replaced by a complete one.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgevlm.export.fuse import FUSED_ATTENTION_MODES, resolve_fused_attention
from edgevlm.export.graphs import DecoderStep, VisionGraph, cache_names
from edgevlm.export.parity import ParityConfig, measure_parity
from edgevlm.export.quantize import QUANTIZED, SCHEMES, QuantConfig, resolve_int8_attention
from edgevlm.export.tensorrt import tensorrt_record

from edgevlm import __version__
from edgevlm.checkpoint import Checkpoint, atomic_write, load_checkpoint
from edgevlm.errors import EdgeVLMError
from edgevlm.models import MedVLM, MedVLMConfig
from edgevlm.runtime.backends import OrtBackend, TorchBackend
from edgevlm.runtime.bundle import (
    DECODER_FILE,
    EMBEDDINGS_FILE,
    MANIFEST,
    PREPROCESS_FILE,
    SCHEMA_VERSION,
    TOKENIZER_FILE,
    VISION_FILE,
    file_table,
    verify_bundle,
)

PRECISIONS = tuple(SCHEMES)  # what each word means: edgevlm.export.quantize.SCHEMES
DEVICES = ("cpu", "cuda")
DEFAULT_OPSET = 18
EXPORTER = "torch.onnx.export(dynamo=True)"
# Example sizes for tracing: >= 2 (torch.export specialises 0/1) and distinct from each other.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_CACHE = 2, 3, 7


@dataclass
class ExportOptions:
    precision: str = "fp32"  # a key of SCHEMES: fp32 | fp16 | int8 | int4 | auto
    device: str = "cpu"  # where the graphs are traced and the parity reference runs
    opset: int = DEFAULT_OPSET
    overwrite: bool = False
    parity: ParityConfig = field(default_factory=ParityConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)  # int8 | int4 | auto only
    fused_attention: str = "auto"  # vision attention as onnxruntime's MultiHeadAttention: auto | on | off

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EdgeVLMError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device not in DEVICES:
            raise EdgeVLMError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise EdgeVLMError("--device cuda: PyTorch sees no CUDA device here; export with --device cpu "
                               "(the bundle runs on any onnxruntime provider either way)")
        if self.fused_attention not in FUSED_ATTENTION_MODES:
            raise EdgeVLMError(f"--fused-attention must be one of {', '.join(FUSED_ATTENTION_MODES)}, "
                               f"got {self.fused_attention!r}")
        if not 17 <= self.opset <= 23:
            raise EdgeVLMError(f"--opset must be within 17..23 (the dynamo exporter's range), got {self.opset}")


def _fused_attention(mode: str, device: str, precision: str, quant: QuantConfig) -> bool:
    """resolve_fused_attention for one export: int8 attention scores only exist in the quantized words."""
    return resolve_fused_attention(mode, device, quant.int8_attention if precision in QUANTIZED else "auto")


def resolve_recipe(cfg: MedVLMConfig) -> Any:
    """The model's preprocessing Recipe (config.preprocess: a preset name or the recipe dict)."""
    from edgevlm.preprocess import Recipe, get_recipe

    source = cfg.preprocess
    recipe = Recipe.from_dict(source) if isinstance(source, dict) else get_recipe(source)
    if tuple(recipe.grid) != tuple(cfg.vision.image_size):
        raise EdgeVLMError(f"preprocess recipe '{recipe.name}' makes a {tuple(recipe.grid)} grid but the vision "
                           f"encoder takes {tuple(cfg.vision.image_size)}; fix config.preprocess")
    return recipe


def _quiet() -> contextlib.AbstractContextManager:
    """The dynamo exporter prints progress lines and deprecation warnings; the CLI prints its own."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _onnx_export(module: torch.nn.Module, args: tuple, names: list[str], outputs: list[str],
                 dynamic_shapes: dict[str, Any], opset: int, path: Path) -> None:
    try:
        with _quiet():
            program = torch.onnx.export(module.eval(), args, input_names=names, output_names=outputs,
                                        dynamic_shapes=dynamic_shapes, dynamo=True, opset_version=opset,
                                        verbose=False)
            program.save(str(path))  # weights inline below 2 GB, else as external data beside the graph
    except EdgeVLMError:
        raise
    except Exception as e:  # torch.export/onnxscript raise many types; name the stage and the first line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EdgeVLMError(f"ONNX export of {path.name} failed ({type(e).__name__}: {first})") from e


def export_vision(model: MedVLM, path: Path, opset: int, device: str, dtype: torch.dtype,
                  fused_attention: bool = False) -> int:
    """Write vision.onnx; with `fused_attention`, its unmasked attentions as onnxruntime's
    MultiHeadAttention (edgevlm.export.fuse). Returns the number of attentions fused."""
    from torch.export import Dim

    example = torch.randn(EXAMPLE_BATCH, 1, *model.cfg.vision.image_size, device=device, dtype=dtype)
    batch = Dim("batch", min=1, max=1024)
    _onnx_export(VisionGraph(model), (example,), ["volume"], ["visual"], {"volume": {0: batch}}, opset, path)
    if not fused_attention:
        return 0
    import onnx
    from edgevlm.export.fuse import fuse_attention

    graph = onnx.load(str(path))
    fused = fuse_attention(graph, model.cfg.vision.heads)
    if fused:
        # protobuf's 2 GB limit: large encoders keep their weights beside the graph, as the exporter does
        external = sum(len(init.raw_data) for init in graph.graph.initializer) > 2**31 - 2**26
        onnx.save(graph, str(path), save_as_external_data=external, location=f"{path.name}.data")
    return fused


def export_decoder(model: MedVLM, path: Path, opset: int, device: str, dtype: torch.dtype) -> None:
    from torch.export import Dim

    d = model.cfg.decoder
    b, t, s = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_CACHE
    past = tuple(torch.zeros(b, d.n_kv_heads, s, d.head_dim, device=device, dtype=dtype)
                 for _ in range(2 * d.n_layers))
    args = (torch.randn(b, t, d.dim, device=device, dtype=dtype), torch.arange(t, device=device),
            torch.arange(t, device=device)[None].expand(b, t).contiguous(),
            torch.ones(b, s, dtype=torch.bool, device=device), *past)
    batch = Dim("batch", min=1, max=1024)
    seq = Dim("seq", min=1, max=d.max_seq_len)
    cache = Dim("cache_len", min=2, max=d.max_seq_len)
    dynamic = {"embeds": {0: batch, 1: seq}, "input_pos": {0: seq}, "rope_pos": {0: batch, 1: seq},
               "key_valid": {0: batch, 1: cache}, "past": tuple({0: batch, 2: cache} for _ in past)}
    names = ["embeds", "input_pos", "rope_pos", "key_valid", *cache_names(d.n_layers, "past")]
    outputs = ["logits", *cache_names(d.n_layers, "present")]
    _onnx_export(DecoderStep(model, functional=True), args, names, outputs, dynamic, opset, path)


def kv_update_in_place_safe(path: Path) -> bool:
    """True when every past cache input is read only by one scatter (as its data input) and by Shape
    nodes: then the runtime may bind past_i and present_i to one buffer (see OrtBackend)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    past = {i.name for i in graph.input if i.name.startswith("past_")}
    uses: dict[str, list[tuple[str, int]]] = {name: [] for name in past}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in uses:
                uses[name].append((node.op_type, slot))
    scatters = {("ScatterElements", 0), ("ScatterND", 0)}
    return bool(past) and all(
        len([u for u in used if u != ("Shape", 0)]) == 1 and all(u in scatters or u == ("Shape", 0) for u in used)
        for used in uses.values())


def _opsets(path: Path) -> dict[str, int]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {imp.domain or "ai.onnx": int(imp.version) for imp in proto.opset_import}


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    return {"edgevlm": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__,
            "python": platform.python_version()}


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def build_bundle(ckpt: Checkpoint, folder: Path, options: ExportOptions, tokenizer_json: str,
                 on_step: Callable[[str], None], calibration: Any = None) -> dict[str, Any]:
    """Write every bundle file into `folder` (a temporary folder); returns the manifest."""
    from safetensors.numpy import save_file

    from edgevlm.models.tokenizer import decision_rules, load_tokenizer, special_ids

    cfg, reference = ckpt.config, ckpt.model
    recipe = resolve_recipe(cfg)
    tokenizer = load_tokenizer(tokenizer_json)
    try:
        ids = special_ids(tokenizer, cfg.prompt)
        decision_rules(tokenizer, cfg.prompt)  # refused here, not at the first report
    except ValueError as e:
        raise EdgeVLMError(f"tokenizer does not fit the model's prompt config: {e}", ckpt.path) from None
    dtype = torch.float16 if options.precision == "fp16" else torch.float32
    # Quantized words start from fp32 graphs (checked against PyTorch first) and rewrite them afterwards.
    graph_precision = "fp16" if options.precision == "fp16" else "fp32"
    # The graph source: the fp32 reference itself, or a converted copy (the reference stays fp32).
    source = reference if dtype == torch.float32 and options.device == "cpu" else copy.deepcopy(reference)
    source = source.to(device=options.device, dtype=dtype).eval()
    t0 = time.perf_counter()
    on_step("exporting vision.onnx")
    with torch.no_grad():
        fused = export_vision(source, folder / VISION_FILE, options.opset, options.device, dtype,
                              _fused_attention(options.fused_attention, options.device, options.precision,
                                               options.quant))
    on_step("exporting decoder.onnx")
    with torch.no_grad():
        export_decoder(source, folder / DECODER_FILE, options.opset, options.device, dtype)
    export_s = time.perf_counter() - t0
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    table = reference.decoder.embed_tokens.weight.detach().float().cpu().numpy().astype(np_dtype)
    save_file({"embed_tokens": np.ascontiguousarray(table)}, str(folder / EMBEDDINGS_FILE))
    _write_text(folder / TOKENIZER_FILE, tokenizer_json)
    _write_text(folder / PREPROCESS_FILE, recipe.to_json())
    del source

    on_step("measuring parity against PyTorch fp32")
    d = cfg.decoder
    kv_in_place = kv_update_in_place_safe(folder / DECODER_FILE)
    ort_backend = OrtBackend(folder / VISION_FILE, folder / DECODER_FILE, d.n_layers, (d.n_kv_heads, d.head_dim),
                             d.vocab_size, graph_precision, kv_in_place=kv_in_place)
    ref_backend = TorchBackend(reference)
    parity = measure_parity(ort_backend, ref_backend, table, table.astype(np.float32), cfg, tokenizer, recipe,
                            graph_precision, options.parity)
    parity["ort_providers"] = list(ort_backend.providers)
    del ort_backend
    if not parity["passed"]:
        raise EdgeVLMError(f"exported graphs miss the {graph_precision} parity gate: "
                           f"{'; '.join(parity['failures'])} (nothing written)", ckpt.path)
    manifest = {
        "format": "edgevlm-bundle",
        "schema_version": SCHEMA_VERSION,
        "edgevlm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "exporter": EXPORTER,
        "opsets": {VISION_FILE: _opsets(folder / VISION_FILE), DECODER_FILE: _opsets(folder / DECODER_FILE)},
        "precision": options.precision,
        "export_device": options.device,
        "export_seconds": round(export_s, 2),
        "source": {"path": str(ckpt.path.resolve()), "name": ckpt.path.name, "kind": ckpt.kind,
                   "sha256": ckpt.sha256},
        "model": cfg.to_dict(),
        "special_ids": {"image": ids.image, "bos": ids.bos, "stop": list(ids.stop), "pad": ids.pad},
        "graphs": {
            "vision": {"file": VISION_FILE, "inputs": {"volume": ["batch", 1, *cfg.vision.image_size]},
                       "outputs": {"visual": ["batch", cfg.num_visual_tokens, d.dim]},
                       "attention": {"fused": fused, "op": "com.microsoft.MultiHeadAttention"} if fused
                       else {"fused": 0, "op": "standard ONNX ops"}},
            "decoder": {
                "file": DECODER_FILE,
                "inputs": {"embeds": ["batch", "seq", d.dim], "input_pos": ["seq"], "rope_pos": ["batch", "seq"],
                           "key_valid": ["batch", "cache_len"],
                           "past_{k,v}_{layer}": ["batch", d.n_kv_heads, "cache_len", d.head_dim]},
                "outputs": {"logits": ["batch", d.vocab_size],
                            "present_{k,v}_{layer}": ["batch", d.n_kv_heads, "cache_len", d.head_dim]},
                "n_layers": d.n_layers,
                "kv_in_place": kv_in_place,
                "note": "one graph for prefill (seq = prompt length) and decode (seq = 1); logits of the last "
                        "position; the cache is static for a generation (cache_len = prompt + max new tokens)",
            },
            "embeddings": {"file": EMBEDDINGS_FILE, "tensor": "embed_tokens", "shape": [d.vocab_size, d.dim]},
        },
        "parity": parity,
    }
    if options.precision in QUANTIZED:
        from edgevlm.export.quantized_bundle import quantize_bundle

        manifest = quantize_bundle(ckpt, folder, manifest, options.precision, options.quant, tokenizer, recipe,
                                   on_step, calibration)
    manifest["tensorrt"] = tensorrt_record({VISION_FILE: folder / VISION_FILE, DECODER_FILE: folder / DECODER_FILE})
    manifest["files"] = file_table(folder)
    return manifest


def _publishable(folder: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries; a bundle is read by other users and services."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o755 & ~umask)
    for f in folder.rglob("*"):
        f.chmod((0o755 if f.is_dir() else 0o644) & ~umask)


def export_bundle(checkpoint_path: str | Path, out_dir: str | Path, precision: str = "fp32", device: str = "cpu",
                  config: Any = None, opset: int = DEFAULT_OPSET, tokenizer_json: str | None = None,
                  overwrite: bool = False, parity: ParityConfig | None = None,
                  on_step: Callable[[str], None] | None = None, quant: QuantConfig | None = None,
                  calibration: Any = None, from_: str | None = None, fused_attention: str = "auto") -> Path:
    """Export a checkpoint to a bundle folder `out_dir`, atomically; returns the bundle path.

    `config`: a MedVLMConfig / JSON file / preset for checkpoints that carry none. `tokenizer_json`:
    the tokenizer.json text when the checkpoint has none. Raises EdgeVLMError (one line) when the
    graphs miss the parity gate of `precision` (edgevlm.export.parity.THRESHOLDS), or a quantized
    precision (int8 | int4 | auto: edgevlm.export.quantize.SCHEMES, options in `quant`) misses its
    accuracy gate (edgevlm.export.gates) and `quant.allow_degradation` is off. `calibration`: a prebuilt
    edgevlm.calibration.CalibrationSet instead of `quant.calib`.
    """
    quant = quant or QuantConfig()
    fused = _fused_attention(fused_attention, device, precision, quant)  # checks the pair first
    options = ExportOptions(precision, device, opset, overwrite, parity or ParityConfig(),
                            resolve_int8_attention(quant, device, fused), fused_attention)
    on_step = on_step or (lambda _msg: None)
    out = Path(out_dir)
    if out.exists() and not options.overwrite:
        raise EdgeVLMError("output exists; choose another -o or pass --overwrite", out)
    if out.exists() and not out.is_dir():
        raise EdgeVLMError("output exists and is not a bundle folder", out)
    on_step("loading checkpoint")
    ckpt = load_checkpoint(checkpoint_path, config, from_=from_)
    tokenizer_json = tokenizer_json or ckpt.tokenizer_json
    if not tokenizer_json:
        raise EdgeVLMError("checkpoint carries no tokenizer; pass --tokenizer tokenizer.json", checkpoint_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifest = build_bundle(ckpt, tmp, options, tokenizer_json, on_step, calibration)
        atomic_write(tmp / MANIFEST, lambda p: _write_text(p, json.dumps(manifest, indent=2, sort_keys=True)))
        verify_bundle(tmp)  # the bundle must pass the very check every reader makes
        _publishable(tmp)
        if out.exists():  # replace only now, with a complete bundle: old -> trash, new -> out, drop trash
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    on_step(f"wrote {out}")
    return out
