"""torch eager vs onnxruntime on exported bundles: vision latency, time to first token, decode tokens/s,
peak RSS; side by side, median of repeats, with the parity measured at export next to the speed.

    python benchmarks/export_runtime.py [--threads N] [--repeats 3] [--new-tokens 16] [--models demo,m3d]

Models:
  demo  edgevlm/assets/demo-teacher.safetensors when present, else the demo-tiny preset with random weights.
  m3d   M3D-LaMed-shaped, random weights: ViT-B (768 x 12) on 32x256x256, patch 4x16x16, spp -> 256 tokens;
        a Phi-3-width decoder (3072, fused qkv/gate_up, vocab 32015) with only 2 layers so it fits a CPU.

On a shared machine (load above the core count) use --threads 1: with more threads than free cores,
OpenMP's busy-waiting barriers slow torch eager's small ops by an order of magnitude (measured 1.3 s vs
40 ms for a demo prefill), which would measure the neighbours, not the backends.

Each backend runs in its own subprocess (one model copy in memory, a clean peak RSS). Both get the same
thread count and the same preprocessed volume and prompt; generation ignores stop tokens so every
run makes exactly --new-tokens steps. Results: a table and benchmarks/results/export_runtime.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "export_runtime.json"
ASSET = Path(__file__).resolve().parent.parent / "edgevlm" / "assets" / "demo-teacher.safetensors"


def m3d_config():
    from edgevlm.models import PRESETS

    cfg = PRESETS["m3d-lamed-phi3"]()
    cfg.name = "m3d-lamed-phi3-2layer"
    cfg.decoder.n_layers = 2
    cfg.decoder.max_seq_len = 1024  # the rope table only; prompts here are ~270 tokens
    return cfg


def prepare(model: str, work: Path) -> tuple[Path, str]:
    """(checkpoint path, description) for a benchmark model."""
    from edgevlm.export.testing import make_checkpoint

    from edgevlm.models import PRESETS

    if model == "demo":
        if ASSET.exists():
            return ASSET, f"trained demo model {ASSET.name}"
        return make_checkpoint(work / "demo-tiny.safetensors", PRESETS["demo-tiny"]()), \
            "demo-tiny preset, random weights (edgevlm/assets/demo-teacher.safetensors not present)"
    return make_checkpoint(work / "m3d.safetensors", m3d_config()), \
        "M3D-LaMed-Phi-3 shape, 2 decoder layers, random weights"


def worker(args: argparse.Namespace) -> None:
    """One backend on one bundle: warm-up, then --repeats timed generations; prints one JSON line."""
    from edgevlm.export.parity import parity_volumes

    from edgevlm.runtime import PeakMemory, load_bundle

    with PeakMemory() as memory:
        session = load_bundle(args.bundle, backend=args.backend, threads=args.threads)
        volume, _ = parity_volumes(session.config, session.recipe, 1, seed=7)
        session.generate(volume[0, 0], "Write the radiology report for this CT.", max_new_tokens=2, ignore_stop=True)
        runs = []
        for _ in range(args.repeats):
            r = session.generate(volume[0, 0], "Write the radiology report for this CT.",
                                 max_new_tokens=args.new_tokens, ignore_stop=True)
            runs.append({"vision_ms": r.timings_ms["vision"], "prefill_ms": r.timings_ms["prefill"],
                         "ttft_ms": r.timings_ms["vision"] + r.timings_ms["prefill"],
                         "decode_ms_per_token": r.decode_ms_per_token, "tokens": r.token_ids})
    med = {k: statistics.median(run[k] for run in runs) for k in ("vision_ms", "prefill_ms", "ttft_ms",
                                                                    "decode_ms_per_token")}
    med["decode_tokens_per_s"] = 1000.0 / med["decode_ms_per_token"]
    print(json.dumps({"backend": args.backend, "providers": session.providers, "load_ms": session.load_ms,
                      "n_prompt_tokens": r.n_prompt_tokens, "median": med, "runs": runs,
                      "peak_rss_mib": memory.peak_rss_bytes / 2**20, "tokens": runs[-1]["tokens"]}))


def run_worker(bundle: Path, backend: str, threads: int, repeats: int, new_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--bundle", str(bundle), "--backend", backend,
           "--threads", str(threads), "--repeats", str(repeats), "--new-tokens", str(new_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{backend} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,m3d")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from edgevlm.export import ParityConfig, export_bundle
    from edgevlm.export.bundle import _versions
    from rich.console import Console
    from rich.table import Table

    console = Console()
    record = {"command": "python " + shlex.join(["benchmarks/export_runtime.py", *sys.argv[1:]]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": _versions(),
              "machine": {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
                          "threads": args.threads, "load_average_1_5_15": list(os.getloadavg())},
              "repeats": args.repeats, "new_tokens": args.new_tokens,
              "models": {}}
    table = Table(title=f"torch eager vs onnxruntime (CPU, {args.threads} threads, median of {args.repeats})")
    for col in ("model", "stage", "torch", "ort", "torch / ort"):
        table.add_column(col, justify="right" if col not in ("model", "stage") else "left")
    with tempfile.TemporaryDirectory(prefix="edgevlm-bench-") as tmp:
        work = Path(tmp)
        for model in args.models.split(","):
            ckpt, description = prepare(model, work)
            start = time.perf_counter()
            bundle = export_bundle(ckpt, work / f"{model}-bundle", parity=ParityConfig(n_volumes=2, max_new_tokens=4),
                                   on_step=lambda msg, m=model: console.print(f"[dim]{m}: {msg}[/]"))
            export_s = time.perf_counter() - start
            manifest = json.loads((bundle / "manifest.json").read_text())
            results = {b: run_worker(bundle, b, args.threads, args.repeats, args.new_tokens) for b in ("torch", "ort")}
            t, o = results["torch"]["median"], results["ort"]["median"]
            ratios = {k: t[k] / o[k] for k in ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token")}
            ratios["peak_rss"] = results["torch"]["peak_rss_mib"] / results["ort"]["peak_rss_mib"]
            record["models"][model] = {
                "description": description, "config": manifest["model"], "export_s": round(export_s, 1),
                "bundle_bytes": sum(f["bytes"] for f in manifest["files"].values()),
                "parity": {k: manifest["parity"][k] for k in ("vision_cosine_min", "logits_max_abs_diff", "inputs")},
                "same_tokens": results["torch"]["tokens"] == results["ort"]["tokens"],
                "n_prompt_tokens": results["ort"]["n_prompt_tokens"],
                "torch": {k: v for k, v in results["torch"].items() if k != "runs"},
                "ort": {k: v for k, v in results["ort"].items() if k != "runs"},
                "torch_over_ort": ratios,
            }
            rows = [("vision", "vision_ms", "ms"), ("prefill", "prefill_ms", "ms"),
                    ("time to first token", "ttft_ms", "ms"), ("decode", "decode_ms_per_token", "ms/token")]
            for label, key, unit in rows:
                table.add_row(model, label, f"{t[key]:,.1f} {unit}", f"{o[key]:,.1f} {unit}", f"{ratios[key]:.2f}x")
            table.add_row(model, "decode rate", f"{t['decode_tokens_per_s']:,.1f} tok/s",
                          f"{o['decode_tokens_per_s']:,.1f} tok/s", f"{ratios['decode_ms_per_token']:.2f}x")
            table.add_row(model, "peak RSS", f"{results['torch']['peak_rss_mib']:,.0f} MiB",
                          f"{results['ort']['peak_rss_mib']:,.0f} MiB", f"{ratios['peak_rss']:.2f}x",
                          end_section=True)
    console.print(table)
    console.print("torch / ort > 1: onnxruntime is faster (or smaller). Same greedy tokens: "
                  + ", ".join(f"{m} {v['same_tokens']}" for m, v in record["models"].items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2, default=float))
    print(json.dumps({m: v["torch_over_ort"] for m, v in record["models"].items()}))


if __name__ == "__main__":
    main()
