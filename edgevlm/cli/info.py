"""`edgevlm info MODEL`: architecture, parameter counts, weight bytes and a memory estimate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from edgevlm.cli import command, console

if TYPE_CHECKING:
    from edgevlm.importers.common import ImportPlan


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@command(name="info")
def info(
    model: str = typer.Argument(..., help="Checkpoint (.safetensors/.ckpt/.pt/.bin), HF-style folder, "
                                "config JSON, or a preset name (m3d-lamed-phi3, demo-tiny, ...)."),
    config: Path | None = typer.Option(None, "--config", help="Model config JSON when the checkpoint has none."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    from_: str | None = typer.Option(None, "--from", help="Read MODEL as a public checkpoint of this kind "
                                     "(m3d-lamed); by default it is auto-detected."),
) -> None:
    """Summarise a model without loading its weights.

    Example: edgevlm info model.safetensors
    Example: edgevlm info ./M3D-LaMed-Phi-3-4B --from m3d-lamed
    """
    from edgevlm.checkpoint import read_config
    from edgevlm.importers import plan_import
    from edgevlm.models.summary import model_summary

    plan = plan_import(model, from_)  # None unless MODEL is a public checkpoint (M3D-LaMed, ...)
    if plan is not None and plan.vision_only:
        _vision_only(plan, as_json)
        return
    if plan is None or config is not None:
        cfg, _, extra = read_config(model, config, from_)
    else:
        cfg, extra = plan.config, plan.extra
    summary = model_summary(cfg)
    if plan is not None:
        summary["import"] = {"from": plan.source, "dropped": plan.dropped_summary(), "notes": plan.notes}
    if as_json:
        console.print_json(json.dumps(summary))
        return
    if plan is not None:
        console.print(f"[bold]imported from {plan.source}[/]: {len(plan.key_map)} keys mapped, "
                      f"{len(plan.dropped)} dropped")
        for line in plan.dropped_summary() + plan.notes:
            console.print(f"  [yellow]notice:[/] {escape(line)}", soft_wrap=True)
    v, p, d = cfg.vision, cfg.projector, cfg.decoder
    console.print(f"[bold]{cfg.name}[/]  ({summary['params_total']:,} parameters)")
    console.print(
        f"  vision   ViT {v.depth}x{v.dim} ({v.heads} heads, MLP {v.mlp_dim}) on {'x'.join(map(str, v.image_size))}"
        f", patch {'x'.join(map(str, v.patch_size))} -> grid {'x'.join(map(str, v.grid))}"
        f" = {v.num_patches} tokens{' + CLS' if v.cls_token else ''}, {v.attention} attention"
    )
    console.print(f"  projector {p.kind}{' pool ' + 'x'.join(map(str, p.pool)) if p.kind == 'spp' else ''}"
                  f" -> {cfg.num_visual_tokens} visual tokens of width {d.dim}")
    console.print(
        f"  decoder  {d.n_layers} layers x {d.dim}, {d.n_heads} heads / {d.n_kv_heads} kv heads, "
        f"FFN {d.intermediate_size}, vocab {d.vocab_size}, rope theta {d.rope_theta:g}"
        f"{', fused qkv/gate_up' if d.fused_qkv else ''}{', qkv bias' if d.qkv_bias else ''}"
        f"{', tied embeddings' if d.tie_embeddings else ''}"
    )
    params = Table(title="Parameters", show_edge=False)
    params.add_column("part")
    params.add_column("parameters", justify="right")
    for part, n in summary["params"].items():
        params.add_row(part.replace("_", " "), f"{n:,}")
    params.add_row("[bold]total[/]", f"[bold]{summary['params_total']:,}[/]")
    console.print(params)
    sizes = Table(title="Weights and estimated peak memory (one study, batch 1)", show_edge=False)
    for col in ("precision", "weights", "peak memory (estimate)"):
        sizes.add_column(col, justify="right")
    for prec, n in summary["weight_bytes"].items():
        sizes.add_row(prec, _gib(n), _gib(summary["peak_memory_bytes"][prec]))
    console.print(sizes)
    if extra and plan is None:
        console.print(f"  notes: {', '.join(sorted(extra))}")


def _vision_only(plan: ImportPlan, as_json: bool) -> None:
    """A public vision tower alone (M3D's pretrained_ViT.bin): its shape and parameter count."""
    import torch

    from edgevlm.models.summary import count_params
    from edgevlm.models.vision import VisionEncoder3D

    v = plan.vision
    with torch.device("meta"):
        n = count_params(VisionEncoder3D(v))
    if as_json:
        console.print_json(json.dumps({"vision_only": True, "from": plan.source, "params": {"vision_encoder": n},
                                       "dropped": plan.dropped_summary(), "notes": plan.notes}))
        return
    console.print(f"[bold]vision tower only[/] ({plan.source}, {n:,} parameters)")
    console.print(f"  vision   ViT {v.depth}x{v.dim} ({v.heads} heads, MLP {v.mlp_dim}) on "
                  f"{'x'.join(map(str, v.image_size))}, patch {'x'.join(map(str, v.patch_size))} -> "
                  f"{v.num_patches} tokens + CLS")
    for line in plan.dropped_summary() + plan.notes:
        console.print(f"  [yellow]notice:[/] {escape(line)}", soft_wrap=True)
