"""`edgevlm train` and `edgevlm eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from edgevlm.cli import command, console
from edgevlm.errors import EdgeVLMError


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=console, transient=False)


@command(name="train")
def train_cmd(
    out: Path = typer.Option(..., "-o", "--out", help="Run folder: tokenizer, last.pt (resume), model.safetensors."),
    model: str = typer.Option("demo-tiny", "--model", help="Preset name or MedVLMConfig JSON."),
    steps: int = typer.Option(2400, "--steps"),
    batch_studies: int = typer.Option(8, "--batch-studies", help="Studies per step (each with report + QAs)."),
    qa_per_study: int = typer.Option(6, "--qa-per-study", help="Question-answer pairs per study and step."),
    aux_weight: float = typer.Option(1.0, "--aux-weight", help="Weight of the training-only finding head (0: off)."),
    lesion_weight: float = typer.Option(1.0, "--lesion-weight",
                                        help="Weight of the training-only lesion heads (0: off)."),
    center_input: bool = typer.Option(True, "--center-input/--no-center-input",
                                      help="Centre the vision input on the mean training volume, folded into "
                                           "the position table at save (see edgevlm.train.CenteredPatchInput)."),
    report_loss: str = typer.Option("sentence", "--report-loss",
                                    help="sentence: mean over report sentences; token: mean over tokens."),
    qa_position_jitter: int = typer.Option(256, "--qa-position-jitter",
                                           help="Train each QA 0..N rotary positions further from the image, so "
                                                "the decoder reads it from anywhere in a report (0: off)."),
    decoder_probe_weight: float = typer.Option(1.0, "--decoder-probe-weight",
                                               help="Weight of the training-only finding probe on the decoder's "
                                                    "hidden states at the answer positions (0: off).", min=0.0),
    impression_weight: float = typer.Option(1.0, "--impression-weight", min=0.0,
                                            help="Report-loss weight of the structured impression's answer "
                                                 "tokens against the other report tokens (1: alike)."),
    positive_impression_weight: float = typer.Option(1.0, "--positive-impression-weight", min=0.0,
                                                     help="Extra factor on those where the finding is "
                                                          "present: greedy calls it at P > 1/(1 + w)."),
    counterfactual_reports: float = typer.Option(0.0, "--counterfactual-reports", min=0.0, max=1.0,
                                                 help="Fraction of report rows swapped for another study's "
                                                      "report, impression answers unweighted, so the findings "
                                                      "text learns to follow the impression (0: off)."),
    vision_steps: int = typer.Option(0, "--vision-steps",
                                     help="Staged recipe: the first N steps train the encoder alone on the "
                                          "finding/lesion heads, then it is frozen for the text stage (0: off).",
                                     min=0),
    vision_batch_studies: int = typer.Option(16, "--vision-batch-studies", help="Studies per vision-stage step."),
    vision_lr: float = typer.Option(1e-3, "--vision-lr", help="Peak LR of the vision stage."),
    autocast: str = typer.Option("auto", "--autocast",
                                 help="auto: bf16 on cuda, fp32 on cpu; bf16: bf16 autocast on either; fp32."),
    n_train_studies: int = typer.Option(2400, "--train-studies", help="Distinct training studies (cached)."),
    lr: float = typer.Option(2e-3, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (bf16 autocast on cuda)."),
    threads: int | None = typer.Option(None, "--threads"),
    eval_every: int = typer.Option(400, "--eval-every"),
    eval_studies: int = typer.Option(24, "--eval-studies", help="Held-out studies for the periodic held-out loss."),
    full_eval_studies: int = typer.Option(0, "--full-eval-studies",
                                          help="Also run the clinical eval on this many held-out studies."),
    init: Path | None = typer.Option(None, "--init", exists=True, dir_okay=False,
                                     help="Continue from a trained edgevlm checkpoint (its config, tokenizer and "
                                          "weights; --model is ignored): --vision-steps more on the encoder, then "
                                          "the text stage over it frozen."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing last.pt instead of resuming."),
) -> None:
    """Train a MedVLM on synthetic chest CT (report generation + question answering).

    Example: edgevlm train -o runs/demo --steps 2400
    """
    from edgevlm.train import TrainConfig, train

    if autocast not in ("auto", "bf16", "fp32"):
        raise typer.BadParameter(f"must be auto, bf16 or fp32, got {autocast!r}", param_hint="--autocast")
    cfg = TrainConfig(model=model, steps=steps, batch_studies=batch_studies, qa_per_study=qa_per_study,
                      aux_weight=aux_weight, lesion_weight=lesion_weight, center_input=center_input,
                      report_loss=report_loss, decoder_probe_weight=decoder_probe_weight,
                      impression_weight=impression_weight, positive_impression_weight=positive_impression_weight,
                      counterfactual_reports=counterfactual_reports,
                      qa_position_jitter=qa_position_jitter, n_train_studies=n_train_studies,
                      vision_steps=vision_steps, vision_batch_studies=vision_batch_studies, vision_lr=vision_lr,
                      autocast=autocast,
                      lr=lr, seed=seed, device=device, threads=threads, eval_every=eval_every,
                      eval_studies=eval_studies, init=str(init) if init else "")
    with _progress() as bar:
        progress = progress_callback(bar, "train", lambda info: f"loss {info['loss']:.3f}" if "loss" in info else "")
        path = train(cfg, out, resume=not fresh, log=console.print, progress=progress,
                     evaluate=periodic_eval(full_eval_studies))
    console.print(f"wrote {path}")


def periodic_eval(n_studies: int) -> Any:
    """A (model, tokenizer, config) -> headline metrics callback over n held-out studies, or None for n = 0.
    The studies are rendered once, up front, and reused at every evaluation."""
    from edgevlm.eval.runner import model_predictor, run_eval, synthetic_studies
    from edgevlm.train import REPORT_QUESTIONS, model_recipe

    if n_studies <= 0:
        return None
    eval_set = list(synthetic_studies(n_studies))

    def evaluate(model: Any, tokenizer: Any, model_cfg: Any) -> dict:
        metrics = run_eval(model_predictor(model, tokenizer), model_recipe(model_cfg), iter(eval_set),
                           REPORT_QUESTIONS[0])
        return _headline(metrics)

    return evaluate


def progress_callback(bar: Progress, default_phase: str, describe: Any) -> Any:
    """A (done, total, info) callback that keeps one bar per phase ("render", "train", ...)."""
    tasks: dict[str, int] = {}

    def progress(done: int, total: int, info: dict) -> None:
        phase = info.get("phase", default_phase)
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total, info="")
        bar.update(tasks[phase], completed=done, info=describe(info))

    return progress


def _headline(metrics: dict) -> dict:
    """The numbers the demo model's targets are stated in (issue: F1, side/lobe, size MAE, closed QA)."""
    findings, lexical = metrics["findings"], metrics["lexical"]
    nodule = findings.get("attributes_by_type", {}).get("nodule", {})

    def acc(d: dict | None) -> float | None:
        return None if not d or d.get("accuracy") is None else round(d["accuracy"], 4)

    return {
        "n_studies": metrics["n_studies"],
        "finding_micro_f1": round(findings["micro"]["f1"], 4),
        "finding_macro_f1": round(findings["macro_types"]["f1"], 4),
        "nodule_side_accuracy": acc(nodule.get("side")),
        "nodule_lobe_accuracy": acc(nodule.get("lobe")),
        "side_accuracy": acc(findings["attributes"].get("side")),
        "lobe_accuracy": acc(findings["attributes"].get("lobe")),
        "nodule_size_mae_mm": None if (mae := findings["nodule_size_mae_mm"]) is None else round(mae, 2),
        "closed_accuracy": acc(metrics["closed"]),
        "self_contradiction_rate": (None if (rate := metrics.get("self_contradiction", {}).get("rate")) is None
                                    else round(rate, 4)),
        "open_accuracy": acc(metrics["open"]),
        **{k: round(v, 4) for k, v in lexical.items() if isinstance(v, float)},
    }


@command(name="eval")
def eval_cmd(
    model: Path = typer.Argument(..., help="Checkpoint or bundle folder."),
    studies: str = typer.Option(..., "--studies", help="A folder written by `studies make-synthetic`, or synthetic:N."),
    seed: int | None = typer.Option(None, "--seed", help="First held-out seed for synthetic:N."),
    json_out: Path | None = typer.Option(None, "--json", help="Write all metrics and per-study predictions here."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens"),
) -> None:
    """Clinical (finding F1, side/lobe accuracy, nodule size error), closed-question and lexical metrics.

    Example: edgevlm eval edgevlm/assets/demo-teacher.safetensors --studies synthetic:100 --json eval.json
    """
    from edgevlm.checkpoint import atomic_write
    from edgevlm.eval.runner import bundle_predictor, checkpoint_predictor, parse_studies, run_eval
    from edgevlm.train import REPORT_QUESTIONS

    if not model.exists():
        raise EdgeVLMError("no such checkpoint or bundle", model)
    if model.is_dir() and (model / "manifest.json").exists():
        predict, recipe = bundle_predictor(model, max_new_tokens)
    else:
        predict, recipe = checkpoint_predictor(model, max_new_tokens)
    source, count = parse_studies(studies, seed)
    with _progress() as bar:
        task = bar.add_task("eval", total=count, info="")
        metrics = run_eval(predict, recipe, source, REPORT_QUESTIONS[0],
                           on_study=lambda i: bar.update(task, completed=i))
    metrics["model"] = str(model)
    metrics["study_source"] = studies
    console.print_json(json.dumps(_headline(metrics)))
    if json_out is not None:
        atomic_write(json_out, lambda p: p.write_text(json.dumps(metrics, indent=1)))
        console.print(f"wrote {json_out}")


@command(name="operating-points")
def operating_points_cmd(
    model: Path = typer.Argument(..., help="A trained edgevlm .safetensors checkpoint (structured reports)."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the checkpoint with its operating points."),
    studies: int = typer.Option(400, "--studies", min=1, help="Calibration studies (synthetic, never trained on)."),
    seed: int | None = typer.Option(None, "--seed", help="First calibration seed (default: DECISION_SEED_START)."),
    max_fpr: float = typer.Option(0.05, "--max-fpr", min=0.0, max=1.0,
                                  help="Most false positives a finding type may be called at, as a rate."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the calibration record here."),
) -> None:
    """Choose where each report decision calls its finding (P(none) thresholds) on calibration studies.

    Example: edgevlm operating-points RUN/model.safetensors -o RUN/model-op.safetensors --studies 400
    """
    from edgevlm.checkpoint import atomic_write
    from edgevlm.eval.operating_points import DECISION_SEED_START, write_with_operating_points

    if not model.is_file():
        raise EdgeVLMError("no such checkpoint file", model)
    if out.resolve() == model.resolve():
        raise EdgeVLMError("--out must differ from the input: the calibrated checkpoint is a new file", out)
    first = DECISION_SEED_START if seed is None else seed
    with console.status(f"calibrating on {studies} studies"):
        record = write_with_operating_points(model, out, studies, first, max_fpr)
    for kind, r in record["per_type"].items():
        console.print(f"{kind:<18} n+ {r['n_positive']:>3}  AUC {r['auc']}  threshold {r['threshold']:.3f}  "
                      f"greedy {r['greedy']}  at threshold {r['at_threshold']}")
    if json_out is not None:
        atomic_write(json_out, lambda p: p.write_text(json.dumps(record, indent=1)))
    console.print(f"wrote {out}")
