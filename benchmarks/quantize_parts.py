"""Which part of the int8 word costs findings: the vision graph (with the projector at int8 or, as exported,
in float), the decoder graph, or the fp16 embedding table, each swapped alone into the fp32 bundle.

    nice -n 19 python benchmarks/quantize_parts.py [--model edgevlm/assets/demo-teacher.safetensors] \
        [--gate-studies 200] [--token-studies 64] [--json benchmarks/results/quantize-parts-demo-teacher.json]

One fp32 and one int8 export of a shipped demo checkpoint (`edgevlm export`, --allow-degradation), plus the
same int8 vision graph quantized with the projector's linears at int8 too (the export before
2026-12-07). Visual tokens: relative error and cosine vs fp32 on --token-studies studies from seed 3,000,000
(disjoint from calibration, 2,000,000.., and gate studies, 1,000,000..). Task: finding F1 / closed accuracy
of each combination on the export's gate studies, through the same predictor and metrics as the gate.
Bundles go under runs/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "edgevlm" / "assets"
TOKEN_SEED_START = 3_000_000


def token_errors(fp32_tokens: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    ref = fp32_tokens.reshape(len(fp32_tokens), -1).astype(np.float64)
    q = tokens.reshape(len(tokens), -1).astype(np.float64)
    rel = np.linalg.norm(q - ref, axis=1) / np.linalg.norm(ref, axis=1)
    cos = (q * ref).sum(1) / np.linalg.norm(q, axis=1) / np.linalg.norm(ref, axis=1)
    return {"relative_error_mean": float(rel.mean()), "relative_error_max": float(rel.max()),
            "cosine_min": float(cos.min())}


def main() -> None:
    import onnx
    from edgevlm.calibration import build_calibration_set
    from edgevlm.export import export_bundle
    from edgevlm.export.bundle import resolve_recipe
    from edgevlm.export.gates import backend_predictor, task_metrics
    from edgevlm.export.quantize import QuantConfig, linear_nodes, quantize_vision_int8, vision_int8_nodes
    from edgevlm.export.quantized_bundle import _ort, gate_set
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    from edgevlm.checkpoint import file_sha256, load_checkpoint
    from edgevlm.runtime.bundle import EMBEDDINGS_FILE, VISION_FILE

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ASSETS / "demo-teacher.safetensors")
    p.add_argument("--gate-studies", type=int, default=200)
    p.add_argument("--token-studies", type=int, default=64)
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quantize-parts")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "quantize-parts-demo-teacher.json")
    args = p.parse_args()
    cfg = load_checkpoint(args.model).config
    recipe = resolve_recipe(cfg)
    # The export's own gate runs on 4 studies (its verdict is not used here); the parts are scored below.
    qcfg = QuantConfig(calib=f"synthetic:{args.calib}", gate_studies="synthetic:4", allow_degradation=True)
    calib = build_calibration_set(qcfg.calib, recipe)  # one set for the export and the projector-int8 graph
    fp32 = export_bundle(args.model, args.out / "fp32", precision="fp32", overwrite=True)
    int8 = export_bundle(args.model, args.out / "int8", precision="int8", overwrite=True, quant=qcfg,
                         calibration=calib, on_step=lambda msg: print(f"[int8] {msg}", flush=True))
    projector_int8 = args.out / "vision-projector-int8.onnx"
    fp32_vision = onnx.load(str(fp32 / VISION_FILE), load_external_data=False)
    projector = [n for n, m in linear_nodes(fp32_vision).items() if "projector" in m.split(".")]
    quantize_vision_int8(fp32 / VISION_FILE, projector_int8, calib.volumes, qcfg,
                         nodes=sorted(vision_int8_nodes(fp32_vision) + projector))

    tables = {"fp32": load_file(str(fp32 / EMBEDDINGS_FILE))["embed_tokens"].astype(np.float32),
              "fp16": load_file(str(int8 / EMBEDDINGS_FILE))["embed_tokens"].astype(np.float32)}
    combos = {  # name: (vision graph, bundle whose decoder graph runs, embedding table)
        "fp32": (fp32 / VISION_FILE, fp32, "fp32"),
        "vision int8 (projector float, as exported)": (int8 / VISION_FILE, fp32, "fp32"),
        "vision int8 (projector int8)": (projector_int8, fp32, "fp32"),
        "decoder int8": (fp32 / VISION_FILE, int8, "fp32"),
        "embeddings fp16": (fp32 / VISION_FILE, fp32, "fp16"),
        "int8 word (as exported)": (int8 / VISION_FILE, int8, "fp16"),
        "int8 word, projector int8": (projector_int8, int8, "fp16"),
    }
    tokenizer = Tokenizer.from_file(str(fp32 / "tokenizer.json"))
    token_set = build_calibration_set(f"synthetic:{args.token_studies}", recipe, seed_start=TOKEN_SEED_START)
    studies = gate_set(f"synthetic:{args.gate_studies}", recipe)
    results: dict = {}
    tokens_of: dict[Path, np.ndarray] = {}  # each vision graph encodes the token studies once
    for name, (vision, decoder_bundle, table) in combos.items():
        backend = _ort(decoder_bundle, cfg, "fp32" if name == "fp32" else "int8", vision=vision)
        if vision not in tokens_of:
            tokens_of[vision] = np.concatenate([backend.encode(token_set.volumes[i:i + 1])
                                                for i in range(len(token_set))])
        tokens, fp32_tokens = tokens_of[vision], tokens_of[fp32 / VISION_FILE]
        t0 = time.perf_counter()
        task = task_metrics(backend_predictor(backend, tables[table], cfg, tokenizer, None), studies,
                            cfg.prompt.default_question)
        fp32_f1 = results["fp32"]["task"]["finding_f1"] if results else task["finding_f1"]
        results[name] = {"visual_tokens": token_errors(fp32_tokens, tokens), "task": task,
                         "f1_retention": task["finding_f1"] / fp32_f1 if fp32_f1 else None,  # None: no F1 to keep
                         "seconds": round(time.perf_counter() - t0, 1)}
        err = results[name]["visual_tokens"]
        print(f"{name:<44} F1 {task['finding_f1']:.4f} (tp {task['tp']}, fp {task['fp']}) closed "
              f"{task['closed_accuracy']:.4f}  visual-token error mean {err['relative_error_mean']:.4f} "
              f"max {err['relative_error_max']:.4f}", flush=True)
    record = {"benchmark": "quantize-parts", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "model": args.model.name, "model_sha256": file_sha256(args.model),
              "gate_studies": f"synthetic:{args.gate_studies} (seeds 1000000..)",
              "token_studies": f"synthetic:{args.token_studies} (seeds {TOKEN_SEED_START}..)",
              "calibration": f"synthetic:{args.calib} (seeds 2000000..)", "config": qcfg.to_dict(),
              "results": results}
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
