"""Quantized graphs side by side on the M3D-LaMed-shaped model: int8 vision latency, decode tokens/s per
decoder precision and as % of the memory-bandwidth bound, weight bytes, peak RSS of inference.

    nice -n 19 python benchmarks/quantize.py [--threads 2] [--new-tokens 16] [--repeats 3] [--layers 2]
    python benchmarks/quantize.py --variants fp32,int8,int8-dynamic,int4 --vision-pairs 0 \
        --json benchmarks/results/quantize-int8-decoders-epyc.json   # decoders only, another CPU's record

Model (random weights; speed does not depend on the values): ViT-B (768 x 12) on 32x256x256, patch 4x16x16
(2048 tokens), spp -> 256 visual tokens; Phi-3-width decoder (3072, fused qkv / gate_up, vocab 32015) with
--layers layers. Graphs are exported once (edgevlm.export.bundle export_vision / export_decoder) and
rewritten with edgevlm.export.quantize, exactly as `edgevlm export --precision ...` does, minus the
accuracy gates (a random model has no accuracy to keep; the gates are measured on the demo model:
benchmarks/results/quantize-demo.json).

Variants: vision fp32 | int8 (static QDQ, 2 calibration volumes), both with the attention fused into
com.microsoft.MultiHeadAttention as `edgevlm export --device cpu` writes them (edgevlm.export.fuse), and
their plain-attention forms for reference (`--fused-attention off`: attention as standard ops, as for
TensorRT; int8 with the int8 score rewrite); decoder fp32 | int8 nbits (MatMulNBits
8-bit) | int8 dynamic (quantize_dynamic) | int4 (MatMulNBits 4-bit RTN, block 32, lm_head int8) |
int4-all (lm_head int4 too). Each runs in its own subprocess (one model in memory: a clean peak RSS) with
the same volume, prompt (BOS + 256 visual tokens + question) and thread count; generation makes exactly
--new-tokens steps. The int8 vision target is judged side by side: the four encoders in one process, runs
interleaved (--vision-pairs each), the median of the per-pair ratios. Bandwidth bound: decode reads every
weight once per token, so tokens/s <= read bandwidth / weight bytes per token; read bandwidth is measured
here (a torch sum over 1 GiB on the same thread count, best of 5).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "quantize.json"
WORK = Path(__file__).resolve().parent.parent / "runs" / "bench-quantize"
VARIANTS = {  # name: (vision graph, decoder graph)
    "fp32": ("vision-fp32.onnx", "decoder-fp32.onnx"),
    "int8": ("vision-int8.onnx", "decoder-int8.onnx"),
    "int8-dynamic": ("vision-int8.onnx", "decoder-int8dyn.onnx"),
    "int4": ("vision-int8.onnx", "decoder-int4.onnx"),
    "int4-all": ("vision-int8.onnx", "decoder-int4all.onnx"),
}


def m3d_config(layers: int):
    from edgevlm.models import PRESETS

    cfg = PRESETS["m3d-lamed-phi3"]()
    cfg.name = f"m3d-lamed-phi3-{layers}layer"
    cfg.decoder.n_layers = layers
    cfg.decoder.max_seq_len = 1024  # the rope table only; prompts here are ~270 tokens
    return cfg


def read_bandwidth_gbs(threads: int) -> float:
    """Read bandwidth with the benchmark's thread count: a threaded torch sum over 1 GiB, best of 5.
    (A numpy sum runs on one core and reads ~half of what two cores can; the bound must use all of them.)"""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(2**28, dtype=torch.float32)  # 1 GiB, far above any cache
    best = min(_timed(a.sum) for _ in range(5))
    return a.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def prepare(work: Path, layers: int) -> dict:
    """Export the fp32 graphs once and write every quantized variant; returns the config as a dict."""
    import numpy as np
    import onnx
    import torch
    from edgevlm.export.bundle import export_decoder, export_vision, resolve_recipe
    from edgevlm.export.fuse import fuse_attention
    from edgevlm.export.parity import parity_volumes
    from edgevlm.export.quantize import (
        SCHEMES,
        QuantConfig,
        default_plan,
        gemm_to_matmul,
        quantize_decoder,
        quantize_vision_int8,
        resolve_int8_attention,
        vision_int8_nodes,
    )

    from edgevlm.models import MedVLM

    cfg = m3d_config(layers)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "decoder-fp32.onnx").exists():
        torch.manual_seed(0)
        model = MedVLM(cfg).eval()
        with torch.no_grad():
            model.decoder.lm_head.weight.mul_(25.0)  # logits spread like a trained model's (export/testing.py)
            print("exporting vision / decoder fp32 graphs", flush=True)
            export_vision(model, work / "vision-fp32-plain.onnx", 18, "cpu", torch.float32)
            export_decoder(model, work / "decoder-fp32.onnx", 18, "cpu", torch.float32)
        np.save(work / "embed.npy", model.decoder.embed_tokens.weight.detach().numpy())
        del model
    if (work / "vision-fp32.onnx").exists() and not (work / "vision-fp32-plain.onnx").exists():
        (work / "vision-fp32.onnx").rename(work / "vision-fp32-plain.onnx")  # a work dir from before the fusion
        for name in ("vision-int8.onnx", "vision-int8-plain.onnx"):
            (work / name).unlink(missing_ok=True)
    if not (work / "vision-fp32.onnx").exists():  # what export_vision writes for --device cpu
        graph = onnx.load(str(work / "vision-fp32-plain.onnx"))
        fuse_attention(graph, cfg.vision.heads)
        onnx.save(graph, str(work / "vision-fp32.onnx"))
    recipe = resolve_recipe(cfg)
    vols = None
    for fused, name in ((True, "vision-int8.onnx"), (False, "vision-int8-plain.onnx")):
        source = work / ("vision-fp32.onnx" if fused else "vision-fp32-plain.onnx")
        # The int8 node set is part of the cache key: a graph quantized under an older rule (the
        # projector at int8) must not be timed as today's int8.
        nodes = vision_int8_nodes(onnx.load(str(source), load_external_data=False))
        stamp = work / f"{name}.nodes.json"
        if not (work / name).exists() or not stamp.exists() or json.loads(stamp.read_text()) != nodes:
            print(f"vision int8 QDQ {name} (2 calibration volumes)", flush=True)
            vols = vols if vols is not None else parity_volumes(cfg, recipe, 2, seed=2_000_000)[0]
            quantize_vision_int8(source, work / name, vols, resolve_int8_attention(QuantConfig(), "cpu", fused))
            stamp.write_text(json.dumps(nodes))
    fp32 = onnx.load(str(work / "decoder-fp32.onnx"))
    gemm_to_matmul(fp32)
    jobs = {"decoder-int8.onnx": ("int8", "int8", QuantConfig(int8_decoder="nbits")),
            "decoder-int8dyn.onnx": ("int8", "int8", QuantConfig(int8_decoder="dynamic")),
            "decoder-int4.onnx": ("int4", "int8", QuantConfig()),
            "decoder-int4all.onnx": ("int4", "int4", QuantConfig())}
    for name, (layers_p, head_p, qcfg) in jobs.items():
        if not (work / name).exists():
            print(f"decoder {name}", flush=True)
            from dataclasses import replace

            plan = default_plan(fp32, replace(SCHEMES["int4"], layers=layers_p, lm_head=head_p))
            quantize_decoder(work / "decoder-fp32.onnx", work / name, plan, qcfg)
    return cfg.to_dict()


def worker(args: argparse.Namespace) -> None:
    """One variant: vision latency (median of repeats) and decode tokens/s; prints one JSON line."""
    import numpy as np
    from edgevlm.export.bundle import kv_update_in_place_safe, resolve_recipe
    from edgevlm.export.parity import parity_volumes

    from edgevlm.models import GenerationConfig
    from edgevlm.runtime import PeakMemory
    from edgevlm.runtime.backends import OrtBackend
    from edgevlm.runtime.session import generate_ids

    cfg = m3d_config(args.layers)
    d = cfg.decoder
    work = Path(args.work)
    vision, decoder = VARIANTS[args.variant]
    with PeakMemory() as memory:
        backend = OrtBackend(work / vision, work / decoder, d.n_layers, (d.n_kv_heads, d.head_dim), d.vocab_size,
                             "fp32" if args.variant == "fp32" else "int4", threads=args.threads,
                             kv_in_place=kv_update_in_place_safe(work / decoder))
        table = np.load(work / "embed.npy")
        table = table if args.variant == "fp32" else table.astype(np.float16)  # SCHEMES: embeddings fp16
        vol, _ = parity_volumes(cfg, resolve_recipe(cfg), 1, seed=7)
        visual = backend.encode(vol)  # warm-up (and the visual tokens when vision is not timed)
        vision_ms = []
        for _ in range(args.vision_repeats):
            t0 = time.perf_counter()
            visual = backend.encode(vol)
            vision_ms.append((time.perf_counter() - t0) * 1000)
        image_id, bos = d.vocab_size - 1, 1  # random model: any ids; 256 image placeholders + a short question
        prompt = [bos] + [image_id] * cfg.num_visual_tokens + list(range(100, 112))
        decode_ms = []
        for _ in range(args.repeats):
            timings: dict[str, float] = {}
            gen = GenerationConfig(max_new_tokens=args.new_tokens)
            tokens = generate_ids(_Cached(backend, visual), table, vol, [prompt], image_id, gen, timings)[0]
            decode_ms.append(timings["decode"] / (len(tokens) - 1))
    print(json.dumps({"variant": args.variant, "vision_ms": statistics.median(vision_ms) if vision_ms else None,
                      "vision_runs_ms": vision_ms, "decode_ms_per_token": statistics.median(decode_ms),
                      "decode_runs_ms": decode_ms, "tokens_per_s": 1000 / statistics.median(decode_ms),
                      # sampled RSS: ru_maxrss of a child inherits the parent's high-water mark across fork/exec
                      "peak_rss_mib": (memory.peak_rss_bytes or 0) / 2**20,
                      "vision_best_ms": min(vision_ms) if vision_ms else None,
                      "decode_best_ms_per_token": min(decode_ms),
                      "providers": backend.providers}))


VISION_SIDE_BY_SIDE = {  # name: graph; "plain" = attention as standard ops (--fused-attention off, TensorRT)
    "fp32": "vision-fp32.onnx", "int8": "vision-int8.onnx",
    "fp32-plain": "vision-fp32-plain.onnx", "int8-plain": "vision-int8-plain.onnx",
}


def vision_pair_worker(args: argparse.Namespace) -> None:
    """The fp32 and int8 vision encoders, fused attention (what `edgevlm export --device cpu` writes) and
    plain, in one process, runs interleaved in a rotating order (the machine is shared and noisy: a ratio
    of two separately timed processes moved by 10-20% between runs); prints one JSON line."""
    import onnxruntime as ort
    from edgevlm.export.bundle import resolve_recipe
    from edgevlm.export.parity import parity_volumes

    from edgevlm.runtime.backends import session_options

    cfg = m3d_config(args.layers)
    options = session_options(args.threads)  # what OrtBackend gives the vision encoder
    work = Path(args.work)
    sessions = {name: ort.InferenceSession(str(work / graph), options, providers=["CPUExecutionProvider"])
                for name, graph in VISION_SIDE_BY_SIDE.items()}
    vol, _ = parity_volumes(cfg, resolve_recipe(cfg), 1, seed=7)
    feed = {"volume": vol.astype("float32")}
    runs: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():  # warm-up
        session.run(None, feed)
    names = list(sessions)
    for i in range(args.vision_repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            sessions[name].run(None, feed)
            runs[name].append((time.perf_counter() - t0) * 1000)
    ratios = [f / q for f, q in zip(runs["fp32"], runs["int8"], strict=True)]
    plain = [f / q for f, q in zip(runs["fp32-plain"], runs["int8-plain"], strict=True)]
    fusion = [p / f for p, f in zip(runs["fp32-plain"], runs["fp32"], strict=True)]
    print(json.dumps({"vision_ms": {k: statistics.median(v) for k, v in runs.items()}, "runs_ms": runs,
                      "speedup_median_of_pairs": statistics.median(ratios), "speedup_pairs": ratios,
                      "plain_speedup_median_of_pairs": statistics.median(plain), "plain_speedup_pairs": plain,
                      "fp32_fused_vs_plain_median": statistics.median(fusion)}))


class _Cached:
    """The backend with its vision output fixed: decode timing without re-running the ViT each repeat."""

    def __init__(self, backend, visual):
        self.backend, self.visual = backend, visual

    def encode(self, volume):
        return self.visual

    def __getattr__(self, name):
        return getattr(self.backend, name)


def run_worker(cmd: list[str], label: str) -> dict:
    """Run one worker subprocess; its last stdout line is its JSON result."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"worker {label} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--work", default=str(WORK))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--vision-repeats", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--vision-pairs", type=int, default=7,
                   help="alternated fp32/int8 vision runs (side by side); 0 skips the side-by-side vision run")
    p.add_argument("--json", default=str(RESULTS), help="where the record goes (default: the committed one)")
    p.add_argument("--vision-pair-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.vision_pair_worker:
        vision_pair_worker(args)
        return
    import onnx
    import onnxruntime
    from edgevlm.export.quantize import graph_weight_bytes, linear_nodes

    from edgevlm.bench.fingerprint import environment

    work = Path(args.work)
    config = prepare(work, args.layers)
    fp32 = onnx.load(str(work / "decoder-fp32.onnx"), load_external_data=False)
    from edgevlm.export.quantize import gemm_to_matmul

    gemm_to_matmul(fp32)
    modules = linear_nodes(fp32)
    del fp32
    bandwidth = read_bandwidth_gbs(args.threads)
    results = {}
    for name in args.variants.split(","):
        vision, decoder = VARIANTS[name]
        cmd = [sys.executable, __file__, "--worker", "--variant", name, "--work", str(work), "--threads",
               str(args.threads), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--layers",
               str(args.layers), "--vision-repeats", str(args.repeats if name in ("fp32", "int8") else 0)]
        print(f"running {name}", flush=True)
        r = run_worker(cmd, name)
        wb = graph_weight_bytes(work / decoder, modules)
        r["decoder_weight_bytes"] = wb
        r["bytes_per_token"] = wb["layers"] + wb["lm_head"]
        r["bound_tokens_per_s"] = bandwidth * 1e9 / r["bytes_per_token"]
        r["pct_of_bound"] = 100 * r["tokens_per_s"] / r["bound_tokens_per_s"]
        table_bytes = config["decoder"]["vocab_size"] * config["decoder"]["dim"] * (4 if name == "fp32" else 2)
        r["bundle_bytes"] = (work / vision).stat().st_size + (work / decoder).stat().st_size + table_bytes
        results[name] = r
        (work / "partial.json").write_text(json.dumps(results, indent=2))  # survives an interrupted run
    vision_pair = None
    if args.vision_pairs:
        print("running vision fp32 / int8 side by side", flush=True)
        cmd = [sys.executable, __file__, "--vision-pair-worker", "--work", str(work), "--threads",
               str(args.threads), "--layers", str(args.layers), "--vision-repeats", str(args.vision_pairs)]
        vision_pair = run_worker(cmd, "vision pair")
    f32 = results.get("fp32")
    summary = {}
    if f32:
        for name, r in results.items():
            summary[name] = {
                "vision_speedup_vs_fp32": (f32["vision_ms"] / r["vision_ms"]) if r.get("vision_ms") else None,
                "decode_speedup_vs_fp32": r["tokens_per_s"] / f32["tokens_per_s"],
                "layer_bytes_ratio": r["decoder_weight_bytes"]["layers"] / f32["decoder_weight_bytes"]["layers"],
                "bundle_bytes_ratio": r["bundle_bytes"] / f32["bundle_bytes"],
            }
    summary["vision_int8_side_by_side"] = vision_pair["speedup_median_of_pairs"] if vision_pair else None
    targets = {"vision_int8_speedup_min": 1.8, "int4_decode_speedup_min": 3.0, "int4_pct_of_bound_min": 40.0,
               "int4_layer_bytes_ratio_max": 0.2}
    print(f"\nread bandwidth {bandwidth:.1f} GB/s, threads {args.threads}, {args.layers} decoder layers")
    print(f"{'variant':<14}{'vision ms':>10}{'decode ms/tok':>15}{'tok/s':>8}{'x fp32':>8}{'% bound':>9}"
          f"{'layers MB':>11}{'lm_head MB':>11}{'layer ratio':>12}{'bundle ratio':>13}{'peak RSS MiB':>14}")
    for name, r in results.items():
        s = summary.get(name, {})
        vis = f"{r['vision_ms']:.0f}" if r.get("vision_ms") else "-"
        print(f"{name:<14}{vis:>10}{r['decode_ms_per_token']:>15.1f}{r['tokens_per_s']:>8.1f}"
              f"{s.get('decode_speedup_vs_fp32', 0):>8.2f}{r['pct_of_bound']:>9.1f}"
              f"{r['decoder_weight_bytes']['layers'] / 1e6:>11.1f}{r['decoder_weight_bytes']['lm_head'] / 1e6:>11.1f}"
              f"{s.get('layer_bytes_ratio', 0):>12.3f}{s.get('bundle_bytes_ratio', 0):>13.3f}"
              f"{r['peak_rss_mib'] or 0:>14.0f}")
    if vision_pair:
        pair_ms = vision_pair["vision_ms"]
        print(f"vision side by side ({args.vision_pairs} interleaved runs each): fp32 {pair_ms['fp32']:.0f} ms, int8 "
              f"{pair_ms['int8']:.0f} ms, int8 {vision_pair['speedup_median_of_pairs']:.2f}x fp32 (median of pairs; "
              f"target >= 1.8x); plain attention (TensorRT form): fp32 {pair_ms['fp32-plain']:.0f} ms, int8 "
              f"{pair_ms['int8-plain']:.0f} ms, {vision_pair['plain_speedup_median_of_pairs']:.2f}x; fused fp32 "
              f"{vision_pair['fp32_fused_vs_plain_median']:.2f}x plain fp32")
    record = {
        "benchmark": "quantize",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": config["name"], "note": "M3D-LaMed-Phi-3 shape, random weights", "layers": args.layers},
        "machine": {"platform": platform.platform(), "cpu": environment()["cpu"], "load_avg": os.getloadavg()},
        "versions": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                     "python": platform.python_version()},
        "settings": {"threads": args.threads, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "graph_optimization_level": "ORT_ENABLE_ALL", "matmulnbits_accuracy_level": 4,
                     "int4_block_size": 32, "prepacking": "on for quantized decoders, off for fp32 (runtime)"},
        "read_bandwidth_gbs": bandwidth,
        "targets": targets,
        "results": results,
        "vision_side_by_side": vision_pair,
        "summary": summary,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
