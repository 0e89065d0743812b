"""`edgevlm distill`: a trained teacher -> a faster student (thin over `edgevlm.distill`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from edgevlm.cli import command, console
from edgevlm.errors import EdgeVLMError


@command(name="distill")
def distill_cmd(
    teacher: Path = typer.Option(..., "--teacher", help="Trained teacher checkpoint (carries its tokenizer)."),
    student: str = typer.Option("demo-small", "--student", help="Student preset name or MedVLMConfig JSON."),
    data: str = typer.Option(..., "--data", help="synthetic:N (labeled) or a folder of unlabeled study folders."),
    out: Path = typer.Option(..., "-o", "--out", help="Run folder: last.pt (resume), history, model.safetensors."),
    config: Path | None = typer.Option(None, "--config", help="DistillConfig JSON; the options below override it."),
    steps: int | None = typer.Option(None, "--steps"),
    batch_studies: int | None = typer.Option(None, "--batch-studies", help="Studies per step."),
    lr: float | None = typer.Option(None, "--lr"),
    temperature: float | None = typer.Option(None, "--temperature", help="KD temperature T (KL is scaled by T^2)."),
    w_kl: float | None = typer.Option(None, "--w-kl", help="Weight of the token-level KL to the teacher."),
    w_ce: float | None = typer.Option(None, "--w-ce", help="Weight of ground-truth cross-entropy (labeled data)."),
    w_seq: float | None = typer.Option(None, "--w-seq", help="Weight of CE on teacher-generated text (unlabeled)."),
    w_vision: float | None = typer.Option(None, "--w-vision", help="Weight of ViT token feature matching."),
    w_hidden: float | None = typer.Option(None, "--w-hidden", help="Weight of decoder hidden-state matching."),
    impression_weight: float | None = typer.Option(None, "--impression-weight", min=0.0,
                                                   help="Weight of the structured impression's answer tokens in "
                                                        "the report's kl/ce/seq (default 1: alike)."),
    positive_impression_weight: float | None = typer.Option(None, "--positive-impression-weight", min=0.0,
                                                            help="Extra factor where the finding is present "
                                                                 "(default 1)."),
    counterfactual_reports: float | None = typer.Option(None, "--counterfactual-reports", min=0.0, max=1.0,
                                                        help="Fraction of labelled report rows swapped for another "
                                                             "study's, impression answers unweighted (default 0)."),
    decoder_probe_weight: float | None = typer.Option(None, "--decoder-probe-weight", min=0.0,
                                                      help="Weight of a training-only finding probe on the "
                                                           "student's decoder state at every answer position "
                                                           "(default 0: off)."),
    pooled_probe_weight: float | None = typer.Option(None, "--pooled-probe-weight", min=0.0,
                                                     help="Weight of a training-only finding probe on the mean of "
                                                          "the student's visual tokens (default 0: off)."),
    report_loss: str | None = typer.Option(None, "--report-loss",
                                           help="sentence (default): report positions weighted per sentence; token."),
    qa_position_jitter: int | None = typer.Option(None, "--qa-position-jitter",
                                                  help="QA text moved 0..N rotary positions (default 256)."),
    no_init: bool = typer.Option(False, "--no-init", help="Start the student from random weights."),
    init: Path | None = typer.Option(None, "--init", help="Start from this trained checkpoint instead of the "
                                     "teacher (e.g. a shallower student from a shipped one); layers mapped alike."),
    seed: int | None = typer.Option(None, "--seed"),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (bf16 autocast on cuda)."),
    threads: int | None = typer.Option(None, "--threads"),
    eval_every: int | None = typer.Option(None, "--eval-every"),
    full_eval_studies: int = typer.Option(0, "--full-eval-studies",
                                          help="Also run the clinical eval on this many held-out studies."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing last.pt instead of resuming."),
) -> None:
    """Distill a trained teacher into a smaller, faster student on the teacher's tokenizer.

    Example: edgevlm distill --teacher edgevlm/assets/demo-teacher.safetensors --student demo-small
    --data synthetic:1600 -o runs/demo-small --steps 4000 (the shipped student's stages: edgevlm/assets/demo-small.json)
    """
    from edgevlm.cli.train import _progress, periodic_eval, progress_callback
    from edgevlm.distill import DistillConfig, distill

    if not teacher.exists():
        raise EdgeVLMError("no such teacher checkpoint", teacher)
    try:
        cfg = DistillConfig.from_json(config.read_text()) if config is not None else DistillConfig()
    except (OSError, ValueError, TypeError) as e:
        raise EdgeVLMError(f"not a valid DistillConfig JSON: {e}", config) from None
    options = {"steps": steps, "batch_studies": batch_studies, "lr": lr, "temperature": temperature, "w_kl": w_kl,
               "w_ce": w_ce, "w_seq": w_seq, "w_vision": w_vision, "w_hidden": w_hidden, "seed": seed,
               "device": device, "threads": threads, "eval_every": eval_every, "report_loss": report_loss,
               "qa_position_jitter": qa_position_jitter, "impression_weight": impression_weight,
               "positive_impression_weight": positive_impression_weight,
               "counterfactual_reports": counterfactual_reports, "decoder_probe_weight": decoder_probe_weight,
               "pooled_probe_weight": pooled_probe_weight}
    cfg = dataclasses.replace(cfg, teacher=str(teacher), student=student, data=data,
                              **{k: v for k, v in options.items() if v is not None})
    if no_init:
        cfg.init_from_teacher = False
    if init is not None:
        if not init.exists():
            raise EdgeVLMError("no such checkpoint to start from", init)
        cfg.init = str(init)
    with _progress() as bar:
        progress = progress_callback(
            bar, "distill", lambda info: f"loss {info['total']:.3f} (kl {info['kl']:.3f})" if "total" in info else "")
        path = distill(cfg, out, resume=not fresh, log=console.print, progress=progress,
                       evaluate=periodic_eval(full_eval_studies))
    console.print(f"wrote {path}")
