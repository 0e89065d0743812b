"""A verified fp32 bundle folder -> the same folder quantized per a precision word, with its gates measured.

Called by `build_bundle` (edgevlm.export.bundle) inside the temporary export folder, after the fp32 graphs
passed their parity gate; raising here leaves nothing written. Steps:
  1. calibration set (edgevlm.calibration) through the bundle's recipe; calibration.json (hashes, no PHI)
  2. vision.onnx -> int8 static QDQ, calibrated
  3. decoder.onnx -> the scheme's plan (auto: sensitivity analysis, edgevlm.export.sensitivity)
  4. embeddings.safetensors -> the scheme's storage dtype
  5. gates (edgevlm.export.gates) against the fp32 graphs, kept aside in a temporary folder
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from edgevlm.export.gates import backend_predictor, judge, measure_parity, task_metrics, thresholds
from edgevlm.export.quantize import (
    SCHEMES,
    QuantConfig,
    default_plan,
    gemm_to_matmul,
    graph_weight_bytes,
    layer_group,
    linear_nodes,
    quantize_decoder,
    quantize_vision_int8,
)

from edgevlm.errors import EdgeVLMError

CALIBRATION_FILE = "calibration.json"
PARITY_VOLUMES = 4
# Gate studies and fp32 task metrics are the same for every precision of one checkpoint: kept per process
# (the demo script exports fp32/int8/int4/auto in one run). Keys hold no data, only sources and hashes.
_GATE_SETS: dict[tuple[str, str], Any] = {}
_FP32_TASK: dict[tuple[str, str, int], dict[str, Any]] = {}


def gate_set(source: str, recipe: Any) -> Any:
    from edgevlm.calibration import GATE_SEED_START, build_calibration_set

    key = (source, recipe.to_json())
    if key not in _GATE_SETS:
        _GATE_SETS[key] = build_calibration_set(source, recipe, seed_start=GATE_SEED_START, with_truth=True)
    return _GATE_SETS[key]


def calibration_record(calib: Any, cfg: QuantConfig) -> dict[str, Any]:
    return {
        "format": "edgevlm-calibration",
        "version": 1,
        "method": cfg.calib_method,
        "activation_symmetric": cfg.activation_symmetric,
        "observer": "onnxruntime.quantization.quantize_static (QDQ, per-channel int8 weights)",
        "input_range": [float(calib.volumes.min()), float(calib.volumes.max())],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **calib.record(),
    }


def _ort(folder: Path, cfg: Any, precision: str, vision: Path | None = None) -> Any:
    from edgevlm.export.bundle import kv_update_in_place_safe

    from edgevlm.runtime.backends import OrtBackend
    from edgevlm.runtime.bundle import DECODER_FILE, VISION_FILE

    d = cfg.decoder
    return OrtBackend(vision or folder / VISION_FILE, folder / DECODER_FILE, d.n_layers, (d.n_kv_heads, d.head_dim),
                      d.vocab_size, precision, kv_in_place=kv_update_in_place_safe(folder / DECODER_FILE))


def quantize_bundle(ckpt: Any, folder: Path, manifest: dict[str, Any], precision: str, qcfg: QuantConfig,
                    tokenizer: Any, recipe: Any, on_step: Callable[[str], None],
                    calibration: Any = None) -> dict[str, Any]:
    """Quantize the fp32 bundle in `folder` in place; returns the updated manifest (files not yet hashed).

    `calibration`: a prebuilt CalibrationSet (Python API and tests), else built from `qcfg.calib`.
    """
    import onnx
    from edgevlm.calibration import build_calibration_set
    from edgevlm.export.parity import PARITY_QUESTIONS
    from safetensors.numpy import load_file, save_file

    from edgevlm.models.tokenizer import encode_prompt, special_ids
    from edgevlm.runtime.bundle import DECODER_FILE, EMBEDDINGS_FILE, VISION_FILE

    scheme, cfg = SCHEMES[precision], ckpt.config
    ids = special_ids(tokenizer, cfg.prompt)
    ref_dir = Path(tempfile.mkdtemp(prefix="edgevlm-fp32-ref-"))
    try:
        for name in (VISION_FILE, DECODER_FILE):
            shutil.copy2(folder / name, ref_dir / name)
        table_ref = load_file(str(folder / EMBEDDINGS_FILE))["embed_tokens"].astype(np.float32)
        ref = _ort(ref_dir, cfg, "fp32")

        on_step(f"calibration set {qcfg.calib if calibration is None else calibration.source}")
        calib = calibration if calibration is not None else build_calibration_set(qcfg.calib, recipe)
        on_step(f"vision.onnx -> int8 QDQ ({qcfg.calib_method} calibration on {len(calib)} studies)")
        quantize_vision_int8(ref_dir / VISION_FILE, folder / VISION_FILE, calib.volumes, qcfg)
        (folder / CALIBRATION_FILE).write_text(json.dumps(calibration_record(calib, qcfg), indent=2))

        table_q = table_ref.astype(np.float16) if scheme.embeddings == "fp16" else table_ref
        save_file({"embed_tokens": np.ascontiguousarray(table_q)}, str(folder / EMBEDDINGS_FILE))

        on_step(f"gate studies {qcfg.gate_studies} (held-out seeds)")
        studies = gate_set(qcfg.gate_studies, recipe)
        n_par = min(PARITY_VOLUMES, len(studies))
        prompts = [encode_prompt(tokenizer, cfg, q) for q in PARITY_QUESTIONS]
        steps = max(8, min(16, cfg.prompt.max_new_tokens))
        report_q = cfg.prompt.default_question
        task_key = (ckpt.sha256, qcfg.gate_studies, qcfg.gate_max_new_tokens or cfg.prompt.max_new_tokens)
        if task_key not in _FP32_TASK:
            on_step(f"fp32 task metrics on {len(studies)} gate studies")
            _FP32_TASK[task_key] = task_metrics(backend_predictor(ref, table_ref, cfg, tokenizer,
                                                                  qcfg.gate_max_new_tokens), studies, report_q)
        task_ref = _FP32_TASK[task_key]
        limit = thresholds(precision)

        feeds = None
        if qcfg.int4_method == "gptq" and scheme.layers in ("int4", "auto"):
            from edgevlm.calibration import decoder_feeds

            on_step(f"decoder calibration: fp32 greedy answers on the {len(calib)} calibration studies (GPTQ)")
            feeds = decoder_feeds(ref, table_ref, calib.volumes, prompts, ids.image, cfg.prompt.max_new_tokens,
                                  tuple(ids.stop))

        def gate(plan: dict[str, str]) -> tuple[dict[str, Any], dict[str, int]]:
            counts = quantize_decoder(ref_dir / DECODER_FILE, folder / DECODER_FILE, plan, qcfg, feeds)
            quant = _ort(folder, cfg, precision)
            parity = measure_parity(quant, ref, table_q, table_ref, studies.volumes[:n_par], prompts, ids.image,
                                    steps)
            partial = judge(parity, None, None, limit)
            if not partial["passed"] and not qcfg.allow_degradation:  # refused anyway: skip the slow task eval
                return partial, counts
            task_q = task_metrics(backend_predictor(quant, table_q, cfg, tokenizer, qcfg.gate_max_new_tokens),
                                  studies, report_q)
            return judge(parity, task_q, task_ref, limit), counts

        fp32_decoder = onnx.load(str(ref_dir / DECODER_FILE))
        gemm_to_matmul(fp32_decoder)
        modules = linear_nodes(fp32_decoder)
        plan = default_plan(fp32_decoder, scheme)
        auto_record = None
        if scheme.layers == "auto":
            from edgevlm.export.sensitivity import choose_mix

            on_step("auto: per-group sensitivity (one group int4 at a time, logit KL vs fp32)")
            plan, verdict, counts, auto_record = choose_mix(plan, modules, gate, ref_dir, cfg, qcfg, ref, table_ref,
                                                            studies.volumes[:n_par], prompts, ids.image, steps,
                                                            on_step, feeds)
        else:
            on_step(f"decoder.onnx -> {scheme.layers} layers, {scheme.lm_head} lm_head; measuring the gate")
            verdict, counts = gate(plan)
    finally:
        shutil.rmtree(ref_dir, ignore_errors=True)

    if not verdict["passed"] and not qcfg.allow_degradation:
        raise EdgeVLMError(f"{precision} bundle misses its accuracy gate: {'; '.join(verdict['failures'])} "
                           "(nothing written; --allow-degradation writes it marked degraded)", ckpt.path)
    from edgevlm.export.bundle import _opsets, kv_update_in_place_safe

    manifest = dict(manifest)
    manifest["precision"] = precision
    manifest["degraded"] = not verdict["passed"]
    manifest["accuracy"] = {"reference": "the fp32 ONNX graphs of this export (parity-checked against PyTorch)",
                            "gate_studies": studies.source, **verdict}
    manifest["calibration"] = {"file": CALIBRATION_FILE, "method": qcfg.calib_method, "count": len(calib)}
    manifest["quantization"] = {
        "version": qcfg.version,
        "scheme": asdict(scheme),
        "config": qcfg.to_dict(),
        "decoder_plan": {modules[n]: p for n, p in sorted(plan.items(), key=lambda kv: modules[kv[0]])},
        "node_counts": counts,
        "embeddings_dtype": str(table_q.dtype),
        "weight_bytes": {"vision": sum(graph_weight_bytes(folder / VISION_FILE).values()),
                         "decoder": graph_weight_bytes(folder / DECODER_FILE, modules),
                         "embeddings": int(table_q.nbytes)},
        "auto": auto_record,
    }
    manifest["opsets"] = {VISION_FILE: _opsets(folder / VISION_FILE), DECODER_FILE: _opsets(folder / DECODER_FILE)}
    manifest["graphs"]["decoder"]["kv_in_place"] = kv_update_in_place_safe(folder / DECODER_FILE)
    manifest["parity"]["note"] = "parity of the fp32 graphs before quantization; the quantized graphs: accuracy"
    return manifest


def group_plan(base: dict[str, str], modules: dict[str, str], groups: dict[str, str]) -> dict[str, str]:
    """`base` with every node of each group in `groups` ({group: precision}) set to that precision."""
    return {n: groups.get(layer_group(modules[n]), p) for n, p in base.items()}
