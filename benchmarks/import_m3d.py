"""Peak memory of importing an M3D-LaMed checkpoint: streaming must not need a second copy of the weights.

Builds a multi-shard checkpoint with M3D-LaMed-Phi-3's exact key names at the real widths (ViT-B 768 x 12
on 1x32x256x256, spp projector to 3072, Phi-3 decoder 3072 wide with the 32015-entry vocabulary) but only
`--layers` decoder layers, then imports it with `edgevlm.checkpoint.load_checkpoint` in a fresh subprocess
per precision and records that process's peak RSS (ru_maxrss, cross-checked by psutil sampling).

Every weight is read once after loading (safetensors tensors are mmap-backed until touched), so the
fp32 peak includes the whole model. Budget: peak RSS above the process's baseline (interpreter + torch,
measured just before loading) must stay below 1.3 x the largest shard + the bytes of the loaded model.
A loader that read every shard before assigning would need the whole checkpoint on top of the model
(2x for fp32) and fail.

    python benchmarks/import_m3d.py               # builds in a temp dir, prints a table, writes JSON
    python benchmarks/import_m3d.py --layers 2 --keep /tmp/m3d-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

RESULTS = Path(__file__).parent / "results" / "import_m3d.json"
VIT = "model.vision_tower.vision_tower."
MB = 2**20


# ----------------------------------------------------------------------------------------- building


def _rnd(*shape: int) -> torch.Tensor:
    return torch.empty(*shape).normal_(0, 0.02)


def shard_groups(layers: int) -> list[dict[str, tuple[int, ...]]]:
    """Key -> shape per shard, in M3D-LaMed-Phi-3's names: embedding | decoder layers | ViT + projector | head."""
    dim, inter, vocab, vdim = 3072, 8192, 32015, 768
    embed = {"model.embed_tokens.weight": (vocab, dim)}
    dec: dict[str, tuple[int, ...]] = {"model.norm.weight": (dim,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        dec.update({p + "self_attn.qkv_proj.weight": (3 * dim, dim), p + "self_attn.o_proj.weight": (dim, dim),
                    p + "mlp.gate_up_proj.weight": (2 * inter, dim), p + "mlp.down_proj.weight": (dim, inter),
                    p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,)})
    vit: dict[str, tuple[int, ...]] = {
        VIT + "patch_embedding.patch_embeddings.1.weight": (vdim, 1024),
        VIT + "patch_embedding.patch_embeddings.1.bias": (vdim,),
        VIT + "patch_embedding.position_embeddings": (1, 2048, vdim), VIT + "cls_token": (1, 1, vdim),
        VIT + "norm.weight": (vdim,), VIT + "norm.bias": (vdim,),
        "model.mm_projector.projector.0.weight": (dim, vdim), "model.mm_projector.projector.0.bias": (dim,),
        "model.mm_projector.projector.2.weight": (dim, dim), "model.mm_projector.projector.2.bias": (dim,),
    }
    for i in range(12):
        b = f"{VIT}blocks.{i}."
        vit.update({b + "norm1.weight": (vdim,), b + "norm1.bias": (vdim,), b + "attn.qkv.weight": (3 * vdim, vdim),
                    b + "attn.out_proj.weight": (vdim, vdim), b + "attn.out_proj.bias": (vdim,),
                    b + "norm2.weight": (vdim,), b + "norm2.bias": (vdim,), b + "mlp.linear1.weight": (3072, vdim),
                    b + "mlp.linear1.bias": (3072,), b + "mlp.linear2.weight": (vdim, 3072),
                    b + "mlp.linear2.bias": (vdim,)})
    head = {"lm_head.weight": (vocab, dim), "model.seg_projector.0.weight": (dim, dim),
            "model.seg_projector.0.bias": (dim,)}
    return [embed, dec, vit, head]


def build(folder: Path, layers: int) -> list[int]:
    """Write the shards one at a time (this process never holds more than one); returns shard sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    groups = shard_groups(layers)
    weight_map, sizes = {}, []
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: _rnd(*s) for k, s in group.items()}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
        sizes.append((folder / name).stat().st_size)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}))
    config = {
        "architectures": ["LamedPhi3ForCausalLM"], "model_type": "lamed_phi3", "hidden_act": "silu",
        "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": 32, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "vocab_size": 32015, "image_channel": 1, "image_size": [32, 256, 256], "patch_size": [4, 16, 16],
        "vision_tower": "vit3d", "vision_select_layer": -1, "vision_select_feature": "patch",
        "mm_projector_type": "spp", "proj_layer_type": "mlp", "proj_layer_num": 2, "proj_pooling_type": "spatial",
        "proj_pooling_size": 2, "mm_hidden_size": 768, "segmentation_module": "segvol", "seg_token_id": 32014,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return sizes


# ----------------------------------------------------------------------------------------- measuring


def child(folder: str, dtype_name: str) -> None:
    """Runs in a fresh process: import, then print one JSON line with the memory numbers."""
    import logging

    import psutil

    from edgevlm.checkpoint import load_checkpoint

    logging.disable(logging.WARNING)  # the dropped-keys notice is expected here
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak_sampled = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_sampled[0] = max(peak_sampled[0], proc.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    ckpt = load_checkpoint(folder, dtype=getattr(torch, dtype_name))
    seconds = time.perf_counter() - t0
    # safetensors hands out tensors backed by a private mmap of the shard: an fp32 load can leave pages
    # unread until first use. Read every weight (as export does) so they all count in the peak.
    with torch.no_grad():
        for t in ckpt.model.state_dict().values():
            t.max()
    done.set()
    sampler.join()
    model_bytes = sum(t.numel() * t.element_size() for t in ckpt.model.state_dict().values())
    ru_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"baseline_rss": baseline, "peak_rss": max(ru_peak, peak_sampled[0]),
                      "peak_rss_sampled": peak_sampled[0], "model_bytes": model_bytes, "seconds": seconds}))


def measure(folder: Path, dtype_name: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--dtype", dtype_name],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1, help="decoder layers (each ~453 MB fp32 at Phi-3 width)")
    ap.add_argument("--keep", type=Path, default=None, help="build the checkpoint here and keep it")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.dtype)
        return 0

    with tempfile.TemporaryDirectory(prefix="m3d-bench-") as tmp:
        folder = args.keep or Path(tmp) / "m3d-lamed-phi3-bench"
        t0 = time.perf_counter()
        sizes = build(folder, args.layers)
        build_s = time.perf_counter() - t0
        largest_tensor = max(4 * torch.Size(s).numel() for g in shard_groups(args.layers) for s in g.values())
        rows = []
        for dtype_name in ("float32", "float16"):
            r = measure(folder, dtype_name)
            r["dtype"] = dtype_name
            r["load_rss"] = r["peak_rss"] - r["baseline_rss"]
            r["budget"] = int(1.3 * max(sizes) + r["model_bytes"])
            r["within_budget"] = r["load_rss"] <= r["budget"]
            rows.append(r)

    print(f"M3D-LaMed-Phi-3-shaped checkpoint: {len(sizes)} shards "
          f"({', '.join(f'{s / MB:.0f}' for s in sizes)} MiB; total {sum(sizes) / MB:.0f} MiB), "
          f"{args.layers} decoder layer(s), built in {build_s:.1f} s")
    header = f"{'dtype':<9}{'baseline':>10}{'peak':>10}{'load':>10}{'model':>10}{'budget':>10}{'load/model':>12}" \
             f"{'time':>8}  ok"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['dtype']:<9}{r['baseline_rss'] / MB:>9.0f}M{r['peak_rss'] / MB:>9.0f}M{r['load_rss'] / MB:>9.0f}M"
              f"{r['model_bytes'] / MB:>9.0f}M{r['budget'] / MB:>9.0f}M{r['load_rss'] / r['model_bytes']:>12.2f}"
              f"{r['seconds']:>7.1f}s  {'yes' if r['within_budget'] else 'NO'}")
    print("load = peak RSS - baseline RSS (interpreter + torch before loading); "
          "budget = 1.3 x largest shard + model bytes")
    print(f"floor of a tensor-at-a-time fp16 cast = model + largest fp32 tensor ({largest_tensor / MB:.0f} MiB)")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "import_m3d", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": {"kind": "M3D-LaMed-Phi-3 key layout, real widths", "decoder_layers": args.layers,
                       "shard_bytes": sizes, "total_bytes": sum(sizes), "largest_tensor_bytes": largest_tensor},
        "rule": "peak_rss - baseline_rss <= 1.3 * max(shard_bytes) + model_bytes",
        "results": rows,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "cpus": os.cpu_count()},
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0 if all(r["within_budget"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
