"""Distillation: a trained teacher MedVLM -> a faster student on the teacher's tokenizer.

The student may have fewer or narrower ViT layers, `sparse3d` attention, more pooling (fewer visual
tokens) and a smaller decoder. A dense-trained model gets sparse attention this way, not by flipping a
switch (DESIGN.md decision 6): the student starts from the teacher's weights where shapes allow and
learns to reproduce the teacher's features and token distributions under its own attention mask.

Losses (weights in `DistillConfig`; each is a mean over answer positions or visual tokens):
  kl      T^2 * KL(softmax(teacher / T) || softmax(student / T)) at every answer position. The T^2 keeps
          gradient magnitudes comparable across temperatures (Hinton et al. 2015).
          kl, ce and seq average positions as `edgevlm.train` does (`answer_weights`): half to reports,
          by sentence, half to QA answers, by answer. Measured: with a plain token mean, a 1-layer
          student kept the teacher's yes/no emphysema answers (0.94) and never wrote emphysema in a
          report (F1 0.00, teacher 0.90): the image-dependent report tokens are a few among ~150.
  ce      cross-entropy on ground-truth text, for labeled studies (synthetic:N).
  seq     cross-entropy on teacher-generated text, for unlabeled studies: sequence-level distillation
          (Kim & Rush 2016). The teacher labels each study once: a report plus answers to presence
          questions for every finding type and follow-up questions for the findings it reports.
  vision  normalized MSE between the student's ViT patch tokens (through a learned projection when the
          widths differ) and the teacher's, average-pooled onto the student's grid when it is coarser.
  hidden  normalized MSE between the final decoder hidden states at answer positions (learned projection
          when widths differ). Normalized = divided by the teacher features' mean square, so the weight
          does not depend on the feature scale.
  probe   multi-label BCE of a training-only linear probe on the student's final hidden state at every
          answer position (`edgevlm.train.DecoderProbe`, the teacher's recipe): each position must know
          every finding, with its side and lobe. Targets: the ground truth, or what the teacher's report
          states for unlabeled studies. Off by default (`decoder_probe_weight` 0).
  pooled_probe  the same targets from a linear probe on the mean of the student's visual tokens (off by
          default, `pooled_probe_weight` 0).
The teacher is frozen, so its ViT tokens and visual tokens are computed once per study and cached; each
step runs only the teacher's decoder. Training studies come from `synthetic:N` (seeds 0..N-1, rendered
at the model grid as in `edgevlm.train`) or a folder of study folders (DICOM series or NIfTI, unlabeled:
any ground truth beside them is never read).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.checkpoint import atomic_write, file_sha256, load_checkpoint, save_checkpoint
from edgevlm.errors import EdgeVLMError
from edgevlm.models import PRESETS, MedVLM, MedVLMConfig
from edgevlm.models.tokenizer import load_tokenizer, special_ids
from edgevlm.train import (
    HELDOUT_SEED_START,
    REPORT_QUESTIONS,
    DecoderProbe,
    _nullcontext,
    _render_worker,
    answer_outputs,
    answer_weights,
    counterfactual_rows,
    finding_labels,
    finding_targets,
    impression_weights,
    lr_at,
    make_batch,
    make_optimizer,
    model_recipe,
    qa_position_shifts,
    render_study,
    sentence_end_table,
    study_texts,
)

# Questions the teacher answers about an unlabeled study, after its report. Presence questions use the
# training phrasings; follow-ups are asked only for finding types the teacher answered "yes" to.
FOLLOW_UP_QUESTIONS = {
    "nodule": ("What is the size of the nodule?", "Where is the nodule?", "Is the nodule solid or ground-glass?",
               "Which lung contains the nodule?", "How many pulmonary nodules are there?"),
    "mass": ("Where is the mass?", "What is the size of the mass?"),
    "pleural_effusion": ("Which side is the pleural effusion on?", "How large is the pleural effusion?"),
    "pneumothorax": ("Which side is the pneumothorax on?",),
    "consolidation": ("Which lobe is consolidated?", "Where is the consolidation?"),
}


@dataclass
class DistillConfig:
    teacher: str = ""  # a checkpoint load_checkpoint reads (it must carry its tokenizer)
    student: str = "demo-small"  # a preset name or a MedVLMConfig JSON file
    data: str = "synthetic:800"  # synthetic:N (labeled, seeds 0..N-1) or a folder of unlabeled studies
    steps: int = 1200
    batch_studies: int = 8
    qa_per_study: int = 3  # sequences per study besides the report
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    temperature: float = 2.0
    report_loss: str = "sentence"  # "sentence" | "token": how report positions share their weight
    qa_position_jitter: int = 256  # QA text moved 0..N rotary positions from the image (as in training)
    w_kl: float = 1.0
    w_ce: float = 0.5  # ground truth (labeled studies)
    w_seq: float = 0.5  # teacher-generated targets (unlabeled studies)
    w_vision: float = 1.0
    w_hidden: float = 0.5
    # `edgevlm.train.impression_weights` on the report positions of kl, ce and seq: the structured
    # impression's answers weigh `impression_weight`, times `positive_impression_weight` where the
    # finding is present (in the ground truth, or as the teacher wrote it). Why: the student distilled
    # with every position alike under-called what its teacher calls (greedy recall effusion 0.09 vs
    # 0.74, cardiomegaly 0.11 vs 1.00; benchmarks/results/decision-tokens-demo-small.json).
    impression_weight: float = 1.0
    positive_impression_weight: float = 1.0
    # As TrainConfig.counterfactual_reports (labelled studies only): reports swapped for another study's,
    # their impression answers out of the loss, so the student's findings text follows its impression too.
    counterfactual_reports: float = 0.0
    # The `probe` loss (module docstring). Why it was tried: teacher-forced on its true reports, a
    # 1-decoder-layer student named the effusion's side at the side word in 9 of 23 held-out studies (its
    # teacher 20; benchmarks/decision_tokens.py `sides`) although its visual tokens hold the side by place
    # (benchmarks/side_readout.py).
    # Measured on the shipped student (README, Distillation): closed-question accuracy 94.9% -> 95.7-96.2%
    # of the teacher's, the side still at chance.
    decoder_probe_weight: float = 0.0
    # The `pooled_probe` loss: the same finding targets from the MEAN of the student's visual tokens. Why it
    # was tried: an average (what one attention layer with a query blind to its line computes) keeps a
    # finding's side only if the tokens' content says it, not just their place in the grid. Measured: it
    # did not put the side into the mean and cost F1 (README, Distillation).
    pooled_probe_weight: float = 0.0
    init_from_teacher: bool = True
    # A trained checkpoint to start from instead of the teacher (same shape matching and layer map), e.g.
    # a shallower student from the shipped one: its layers already follow the teacher.
    init: str = ""
    label_max_new_tokens: int | None = None  # None: the teacher's prompt default
    heldout_studies: int = 8  # fixed held-out batch for the held-out KL / CE (0: none)
    eval_every: int = 400
    checkpoint_every: int = 100
    log_every: int = 25
    feature_batch: int = 8  # studies per teacher forward when caching teacher features
    render_workers: int = 2
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DistillConfig:
        data = json.loads(text)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown DistillConfig fields: {sorted(unknown)}")
        return cls(**data)


@dataclass
class TrainStudy:
    name: str
    volume: torch.Tensor  # (D, H, W) float16 at the student's grid
    teacher_volume: torch.Tensor | None  # at the teacher's grid, when its input differs from the student's
    spec: Any = None  # StudySpec: ground truth (synthetic studies)
    labels: dict | None = None  # teacher-generated {"report": str, "qa": [[question, answer], ...]}


# ------------------------------------------------------------------------------------------- models


def student_config(student: str, teacher_cfg: MedVLMConfig, vocab_size: int) -> MedVLMConfig:
    """The student's config; it shares the teacher's tokenizer, so its vocabulary must match."""
    if student in PRESETS:
        cfg = PRESETS[student]()
        cfg.decoder.vocab_size = vocab_size  # a preset's vocab is a placeholder; the tokenizer decides
        return cfg
    path = Path(student)
    if not path.is_file():
        raise EdgeVLMError(f"--student must be a preset ({', '.join(PRESETS)}) or a MedVLMConfig JSON file", path)
    try:
        cfg = MedVLMConfig.from_json(path.read_text())
    except (ValueError, TypeError) as e:
        raise EdgeVLMError(f"not a valid student config: {e}", path) from None
    if cfg.decoder.vocab_size != vocab_size:
        raise EdgeVLMError(f"student decoder.vocab_size {cfg.decoder.vocab_size} != the teacher tokenizer's "
                           f"{vocab_size}: a student shares its teacher's tokenizer; set vocab_size {vocab_size}",
                           path)
    return cfg


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer for each student layer: evenly spaced, first and last kept (4 -> 2: [0, 3]).

    The last teacher layer is kept because the final norm and the next stage were trained on its output.
    """
    if n_student <= 0:
        return []
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def teacher_key(student_key: str, vision_map: list[int], decoder_map: list[int]) -> str:
    """The teacher tensor a student tensor is initialized from (block indices remapped)."""
    for prefix, mapping in (("vision.blocks.", vision_map), ("decoder.layers.", decoder_map)):
        if student_key.startswith(prefix):
            index, rest = student_key[len(prefix):].split(".", 1)
            if int(index) < len(mapping):
                return f"{prefix}{mapping[int(index)]}.{rest}"
    return student_key


@torch.no_grad()
def init_from_teacher(student: MedVLM, teacher: MedVLM) -> dict[str, Any]:
    """Copy every teacher tensor whose (remapped) name and shape match; report what was and was not copied.

    Same-shaped tensors copy exactly; nothing is sliced or resized, because a truncated width is not a
    better start than a fresh init for a network that is then trained on the teacher's outputs anyway.
    """
    vision_map = layer_map(student.cfg.vision.depth, teacher.cfg.vision.depth)
    decoder_map = layer_map(student.cfg.decoder.n_layers, teacher.cfg.decoder.n_layers)
    source = teacher.state_dict()
    copied: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, tensor in student.state_dict().items():
        key = teacher_key(name, vision_map, decoder_map)
        if key not in source:
            skipped[name] = "no teacher tensor"
        elif source[key].shape != tensor.shape:
            skipped[name] = f"shape {tuple(tensor.shape)} != teacher {key} {tuple(source[key].shape)}"
        else:
            tensor.copy_(source[key])
            copied[name] = key
    n_params = sum(t.numel() for t in student.state_dict().values())
    n_copied = sum(student.state_dict()[n].numel() for n in copied)
    return {"vision_layer_map": vision_map, "decoder_layer_map": decoder_map, "copied": copied, "skipped": skipped,
            "copied_fraction": round(n_copied / max(n_params, 1), 4)}


def feature_projections(student_cfg: MedVLMConfig, teacher_cfg: MedVLMConfig) -> nn.ModuleDict:
    """Learned student -> teacher width maps for feature matching (identity when widths match)."""

    def proj(d_student: int, d_teacher: int) -> nn.Module:
        return nn.Identity() if d_student == d_teacher else nn.Linear(d_student, d_teacher)

    return nn.ModuleDict({"vision": proj(student_cfg.vision.dim, teacher_cfg.vision.dim),
                          "hidden": proj(student_cfg.decoder.dim, teacher_cfg.decoder.dim)})


def pool_to_grid(tokens: torch.Tensor, grid: tuple[int, int, int], target: tuple[int, int, int]) -> torch.Tensor:
    """(B, d*h*w, C) raster tokens -> (B, d'*h'*w', C) averaged onto a coarser grid (each axis divides)."""
    if tuple(grid) == tuple(target):
        return tokens
    if any(g % t for g, t in zip(grid, target, strict=True)):
        raise EdgeVLMError(f"vision feature matching needs the teacher token grid {grid} to be a multiple of the "
                           f"student's {target}; set w_vision 0 or change the student's patch size")
    b, _, c = tokens.shape
    kernel = tuple(g // t for g, t in zip(grid, target, strict=True))
    # (B, N, C) -> (B, C, d, h, w) -> (B, C, d', h', w') -> (B, N', C)
    x = F.avg_pool3d(tokens.transpose(1, 2).reshape(b, c, *grid), kernel_size=kernel, stride=kernel)
    return x.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------- losses


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
          weights: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * mean over positions of KL(teacher_T || student_T); logits (K, vocab). `weights` (K,), summing
    to 1, replace the plain mean."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1)  # (K,)
    kl = kl.mean() if weights is None else (kl * weights).sum()
    return kl * temperature**2


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE divided by the teacher features' mean square: 0 is a perfect match, 1 is predicting zeros."""
    if student.numel() == 0:
        return student.sum() * 0.0
    teacher = teacher.float()
    return F.mse_loss(student.float(), teacher) / teacher.pow(2).mean().clamp_min(1e-6)


def distill_losses(student: MedVLM, teacher: MedVLM, projections: nn.ModuleDict, cfg: DistillConfig,
                   student_batch: tuple, teacher_batch: tuple, teacher_patch: torch.Tensor,
                   teacher_visual: torch.Tensor, labeled: bool, sentence_ends: torch.Tensor | None = None,
                   qa_shift: torch.Tensor | None = None,
                   report_weights: torch.Tensor | None = None,
                   probe: tuple[nn.Module, torch.Tensor] | None = None,
                   pooled_probe: tuple[nn.Module, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every loss term and their weighted sum ("total") for one batch.

    student_batch: make_batch(...) for the student's prompt layout; teacher_batch: (reports, qas, image_id)
    for the teacher's (the answer tokens are the same, their positions differ with the visual token count).
    teacher_patch: teacher ViT tokens on the student's grid (B, N, C_t); teacher_visual: (B, M_t, dim_t).
    sentence_ends: `sentence_end_table`, for a sentence-mean report loss (`answer_weights`); qa_shift: rotary
    offsets of the QA text, the same for student and teacher (`text_rope_positions`); report_weights: (B, T)
    per-token factors on the report positions (`impression_weights`); probe / pooled_probe: (DecoderProbe,
    finding targets (B, L)) add the `probe` / `pooled_probe` terms.
    """
    volumes, reports, qas, image_id = student_batch
    patch = student.vision.patch_tokens(volumes)  # (B, N, C_s)
    visual = student.projector(patch)  # (B, M, dim)
    logits, hidden, targets = answer_outputs(student, visual, reports, qas, image_id, qa_shift)
    with torch.no_grad():
        t_logits, t_hidden, t_targets = answer_outputs(teacher, teacher_visual, *teacher_batch, qa_shift=qa_shift)
    if not torch.equal(targets, t_targets):
        raise RuntimeError("student and teacher answer tokens differ: the prompt layouts do not align")
    weights = answer_weights(reports[1], qas[1], sentence_ends, report_weights).to(logits.device)
    ce = ((F.cross_entropy(logits.float(), targets, reduction="none") * weights).sum() if targets.numel()
          else logits.sum() * 0.0)
    losses = {
        "kl": kd_kl(logits, t_logits, cfg.temperature, weights),
        "ce" if labeled else "seq": ce,
        "vision": feature_loss(projections["vision"](patch), teacher_patch),
        "hidden": feature_loss(projections["hidden"](hidden), t_hidden),
    }
    if probe is not None:
        head, findings = probe
        rows = answer_rows(reports[1], qas[1], qas[2]).to(findings.device)
        losses["probe"] = (F.binary_cross_entropy_with_logits(head(hidden).float(), findings[rows].float())
                           if rows.numel() else hidden.sum() * 0.0)
    if pooled_probe is not None:
        head, findings = pooled_probe
        losses["pooled_probe"] = F.binary_cross_entropy_with_logits(head(visual.mean(1)).float(), findings.float())
    weights = {"kl": cfg.w_kl, "ce": cfg.w_ce, "seq": cfg.w_seq, "vision": cfg.w_vision, "hidden": cfg.w_hidden,
               "probe": cfg.decoder_probe_weight, "pooled_probe": cfg.pooled_probe_weight}
    losses["total"] = sum(weights[k] * v for k, v in losses.items())
    return losses


def answer_rows(report_labels: torch.Tensor, qa_labels: torch.Tensor, qa_owner: torch.Tensor) -> torch.Tensor:
    """(K,) the study index of each of `answer_outputs`' K answer positions (reports, then QAs)."""
    rows = [torch.arange(report_labels.shape[0], device=report_labels.device)[:, None].expand(
        -1, report_labels.shape[1] - 1)[report_labels[:, 1:] != -100]]
    if qa_labels.shape[0]:
        rows.append(qa_owner[:, None].expand(-1, qa_labels.shape[1] - 1)[qa_labels[:, 1:] != -100])
    return torch.cat(rows)


def probe_targets(study: TrainStudy) -> torch.Tensor:
    """(L,) `finding_targets` of a study: its ground truth, else what the teacher's report states."""
    if study.spec is not None:
        return finding_targets(study.spec)
    from types import SimpleNamespace

    from edgevlm.eval.extract import extract_findings

    return finding_targets(SimpleNamespace(findings=extract_findings((study.labels or {}).get("report", ""))))


# ----------------------------------------------------------------------------------------------- data


def parse_data(data: str) -> tuple[str, Any]:
    """`synthetic:N` -> ("synthetic", N); a folder -> ("folder", Path)."""
    if data.startswith("synthetic:"):
        try:
            n = int(data.split(":", 1)[1])
        except ValueError:
            raise EdgeVLMError(f"--data {data!r}: expected synthetic:N with N a number") from None
        if not 0 < n <= HELDOUT_SEED_START:
            raise EdgeVLMError(f"--data {data!r}: N must be in 1..{HELDOUT_SEED_START} (training seeds)")
        return "synthetic", n
    path = Path(data)
    if not path.is_dir():
        raise EdgeVLMError("--data must be a folder of study folders or synthetic:N", path)
    return "folder", path


def study_folders(folder: Path) -> list[Path]:
    """Each subfolder is one study; `<study>/dicom/` is used when present (`studies make-synthetic` layout)."""
    studies = [p / "dicom" if (p / "dicom").is_dir() else p
               for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if not studies:
        raise EdgeVLMError("no study folders found (expected one subfolder per study)", folder)
    return studies


def same_input(a: MedVLMConfig, b: MedVLMConfig) -> bool:
    return model_recipe(a).to_dict() == model_recipe(b).to_dict() and a.vision.image_size == b.vision.image_size


def load_studies(cfg: DistillConfig, student_cfg: MedVLMConfig, teacher_cfg: MedVLMConfig,
                 log: Callable[[str], None], progress: Callable[[int, int, dict], None] | None) -> list[TrainStudy]:
    """Training studies at the student's grid (and the teacher's, when it differs)."""
    kind, source = parse_data(cfg.data)
    shared = same_input(student_cfg, teacher_cfg)
    studies: list[TrainStudy] = []
    if kind == "synthetic":
        log(f"rendering {source} training studies at the model grid")
        workers = max(1, min(cfg.render_workers, os.cpu_count() or 1))
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            jobs = ((seed, student_cfg) for seed in range(source))
            for vol, spec in pool.imap(_render_worker, jobs, chunksize=8):
                t_vol = None if shared else torch.from_numpy(render_study(spec.seed, teacher_cfg)[0]).half()
                studies.append(TrainStudy(spec.study_id, torch.from_numpy(vol).half(), t_vol, spec=spec))
                if progress:
                    progress(len(studies), source, {"phase": "render"})
        return studies
    from edgevlm.io import load_study
    from edgevlm.preprocess import preprocess

    paths = study_folders(source)
    log(f"loading {len(paths)} unlabeled studies from {source} (the teacher labels them)")
    s_recipe, t_recipe = model_recipe(student_cfg), model_recipe(teacher_cfg)
    for path in paths:
        volume = load_study(path)
        t_vol = None if shared else torch.from_numpy(preprocess(volume, t_recipe)).half()
        name = path.parent.name if path.name == "dicom" else path.name
        studies.append(TrainStudy(name, torch.from_numpy(preprocess(volume, s_recipe)).half(), t_vol))
        if progress:
            progress(len(studies), len(paths), {"phase": "load"})
    return studies


@torch.no_grad()
def teacher_features(teacher: MedVLM, studies: list[TrainStudy], student_grid: tuple[int, int, int],
                     device: torch.device, batch: int, autocast: Any,
                     progress: Callable[[int, int, dict], None] | None = None) -> tuple[list, list]:
    """Per study: teacher ViT patch tokens pooled onto the student grid (N, C_t) and visual tokens (M_t, dim_t),
    float16 on the CPU. The teacher is frozen, so these are computed once rather than every step."""
    patches, visuals = [], []
    for start in range(0, len(studies), batch):
        chunk = studies[start:start + batch]
        vols = torch.stack([s.volume if s.teacher_volume is None else s.teacher_volume for s in chunk])
        with autocast:
            patch = teacher.vision.patch_tokens(vols.float().unsqueeze(1).to(device))  # (B, N_t, C_t)
            visual = teacher.projector(patch)  # (B, M_t, dim_t)
        patch = pool_to_grid(patch.float(), teacher.cfg.vision.grid, student_grid)
        patches.extend(patch.half().cpu())
        visuals.extend(visual.half().cpu())
        if progress:
            progress(len(patches), len(studies), {"phase": "teacher features"})
    return patches, visuals


def unlabeled_questions() -> list[str]:
    """Presence questions for every finding type, in every training phrasing."""
    from edgevlm.data.reports import _PRESENCE_Q  # the training phrasings, so the student sees them all

    return [q for phrasings in _PRESENCE_Q.values() for q in phrasings]


def label_study(predict: Callable[[np.ndarray, list[str]], list[str]], volume: np.ndarray) -> dict:
    """The teacher's report and answers for one study: presence questions, then follow-ups for 'yes'."""
    from edgevlm.data.reports import _PRESENCE_Q

    presence = unlabeled_questions()
    answers = predict(volume, [REPORT_QUESTIONS[0], *presence])
    report, qa = answers[0], list(zip(presence, answers[1:], strict=True))
    said_yes = {t for t, phrasings in _PRESENCE_Q.items() if any(a.strip().lower().startswith("yes")
                                                                  for q, a in qa if q in phrasings)}
    follow_ups = [q for t in sorted(said_yes) for q in FOLLOW_UP_QUESTIONS.get(t, ())]
    if follow_ups:
        qa += list(zip(follow_ups, predict(volume, follow_ups), strict=True))
    return {"report": report, "qa": [list(p) for p in qa]}


def teacher_label_all(teacher: MedVLM, tokenizer: Any, studies: list[TrainStudy], path: Path,
                      max_new_tokens: int | None, progress: Callable[[int, int, dict], None] | None) -> None:
    """Label every study with the teacher; cached in `path` (JSON by study name) so a resumed run reuses it."""
    from edgevlm.eval.runner import model_predictor

    cache = json.loads(path.read_text()) if path.exists() else {}
    predict = model_predictor(teacher, tokenizer, max_new_tokens)
    for i, study in enumerate(studies):
        if study.name not in cache:
            volume = (study.volume if study.teacher_volume is None else study.teacher_volume).float().numpy()
            cache[study.name] = label_study(predict, volume)
            if (i + 1) % 16 == 0 or i + 1 == len(studies):
                atomic_write(path, lambda p, c=dict(cache): p.write_text(json.dumps(c, indent=1)))
        study.labels = cache[study.name]
        if progress:
            progress(i + 1, len(studies), {"phase": "teacher labels"})
    atomic_write(path, lambda p: p.write_text(json.dumps(cache, indent=1)))


def study_targets(study: TrainStudy, rng: random.Random, n_qa: int) -> tuple[tuple[str, str], list[tuple[str, str]]]:
    """(report question, report) and up to n_qa QA pairs: ground truth when the study has it, else the teacher's."""
    if study.spec is not None:
        return study_texts(study.spec, rng, n_qa)
    labels = study.labels or {}
    qas = [tuple(p) for p in labels.get("qa", [])]
    return (rng.choice(REPORT_QUESTIONS), labels.get("report", "")), rng.sample(qas, min(n_qa, len(qas)))


# ------------------------------------------------------------------------------------------- training


def distill(cfg: DistillConfig, out_dir: str | Path, resume: bool = True, log: Callable[[str], None] = print,
            progress: Callable[[int, int, dict], None] | None = None,
            evaluate: Callable[[MedVLM, Any, MedVLMConfig], dict] | None = None) -> Path:
    """Distill the teacher into the student; writes `out_dir/model.safetensors`, resumable from `last.pt`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    atomic_write(out_dir / "distill_config.json", lambda p: p.write_text(cfg.to_json()))

    t_ckpt = load_checkpoint(cfg.teacher)
    if t_ckpt.tokenizer_json is None:
        raise EdgeVLMError("teacher checkpoint carries no tokenizer; the student needs the teacher's", cfg.teacher)
    tokenizer = load_tokenizer(t_ckpt.tokenizer_json)
    vocab = tokenizer.get_vocab_size()
    teacher_cfg = t_ckpt.config
    if teacher_cfg.decoder.vocab_size != vocab:
        raise EdgeVLMError(f"teacher decoder.vocab_size {teacher_cfg.decoder.vocab_size} != its tokenizer's {vocab}",
                           cfg.teacher)
    teacher = t_ckpt.model.float().to(device).eval().requires_grad_(False)
    student_cfg = student_config(cfg.student, teacher_cfg, vocab)
    try:
        ids_s, ids_t = special_ids(tokenizer, student_cfg.prompt), special_ids(tokenizer, teacher_cfg.prompt)
    except ValueError as e:
        raise EdgeVLMError(f"student prompt does not fit the teacher's tokenizer: {e}") from None

    student = MedVLM(student_cfg).to(device)
    init: dict[str, Any] = {"copied": {}, "skipped": {}}
    if cfg.init:
        init = {**init_from_teacher(student, load_checkpoint(cfg.init).model.float()), "source": Path(cfg.init).name}
        log(f"initialized from {cfg.init}: {len(init['copied'])} tensors copied "
            f"({init['copied_fraction']:.0%} of the student's parameters; ViT layers {init['vision_layer_map']}, "
            f"decoder layers {init['decoder_layer_map']}), {len(init['skipped'])} fresh")
    elif cfg.init_from_teacher:
        init = init_from_teacher(student, teacher)
        log(f"initialized from the teacher: {len(init['copied'])} tensors copied "
            f"({init['copied_fraction']:.0%} of the student's parameters; ViT layers {init['vision_layer_map']}, "
            f"decoder layers {init['decoder_layer_map']}), {len(init['skipped'])} fresh")
    projections = feature_projections(student_cfg, teacher_cfg).to(device)
    probe_head = DecoderProbe(student_cfg.decoder.dim, len(finding_labels())).to(device)
    pooled_head = DecoderProbe(student_cfg.decoder.dim, len(finding_labels())).to(device)
    optimizer = make_optimizer(
        [*student.named_parameters(), *(("proj." + n, p) for n, p in projections.named_parameters()),
         *((("probe." + n, p) for n, p in probe_head.named_parameters()) if cfg.decoder_probe_weight > 0 else ()),
         *((("pooled." + n, p) for n, p in pooled_head.named_parameters()) if cfg.pooled_probe_weight > 0 else ())],
        cfg.lr, cfg.weight_decay)
    start_step, history = 0, []
    last = out_dir / "last.pt"
    if resume and last.exists():
        state = torch.load(last, map_location=device, weights_only=True)
        student.load_state_dict(state["student"])
        projections.load_state_dict(state["projections"])
        if "decoder_probe" in state:
            probe_head.load_state_dict(state["decoder_probe"])
        if "pooled_probe" in state:
            pooled_head.load_state_dict(state["pooled_probe"])
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError:
            raise EdgeVLMError("last.pt was written with the probes on or off otherwise (--decoder-probe-weight, "
                               "--pooled-probe-weight); resume with the same, or start over with --fresh",
                               last) from None
        start_step, history, init = int(state["step"]), json.loads(state["history"]), json.loads(state["init"])
        log(f"resumed from {last} at step {start_step}")

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nullcontext()
    t0 = time.perf_counter()
    studies = load_studies(cfg, student_cfg, teacher_cfg, log, progress)
    labeled = studies[0].spec is not None
    if not labeled:
        teacher_label_all(teacher, tokenizer, studies, out_dir / "teacher_labels.json", cfg.label_max_new_tokens,
                          progress)
    t_patch, t_visual = teacher_features(teacher, studies, student_cfg.vision.grid, device, cfg.feature_batch,
                                         autocast, progress)
    log(f"{len(studies)} studies ready in {time.perf_counter() - t0:.0f} s")
    heldout = heldout_set(cfg, student_cfg, teacher_cfg, teacher, device, autocast)
    probing = cfg.decoder_probe_weight > 0 or cfg.pooled_probe_weight > 0
    findings = torch.stack([probe_targets(s) for s in studies]) if probing else None
    heldout_findings = torch.stack([probe_targets(s) for s in heldout[0]]) if probing and heldout else None

    def probes_for(rows: torch.Tensor | None) -> dict[str, tuple | None]:
        """`distill_losses`' probe arguments for a batch of finding targets (B, L); none when probing is off."""
        if rows is None:
            return {}
        rows = rows.to(device)
        return {"probe": (probe_head, rows) if cfg.decoder_probe_weight > 0 else None,
                "pooled_probe": (pooled_head, rows) if cfg.pooled_probe_weight > 0 else None}

    def batch_for(members: list[TrainStudy], texts: list, patch: list, visual: list) -> tuple:
        s_batch = make_batch([s.volume for s in members], texts, tokenizer, student_cfg, ids_s, device)
        _, t_reports, t_qas, t_image = make_batch([s.volume for s in members], texts, tokenizer, teacher_cfg, ids_t,
                                                  device)
        return (s_batch, (t_reports, t_qas, t_image), torch.stack(patch).to(device), torch.stack(visual).to(device))

    order_rng = random.Random(cfg.seed * 7919 + start_step)
    text_rng = random.Random(cfg.seed * 104729 + start_step)
    if cfg.report_loss not in ("sentence", "token"):
        raise EdgeVLMError(f"report_loss must be 'sentence' or 'token', got {cfg.report_loss!r}")
    sentence_ends = sentence_end_table(tokenizer) if cfg.report_loss == "sentence" else None
    max_seq = min(student_cfg.decoder.max_seq_len, teacher_cfg.decoder.max_seq_len)

    def qa_shift_for(args: tuple) -> torch.Tensor | None:
        """The same QA offsets for student and teacher, inside both models' RoPE tables."""
        (_, _, (s_qa, _, _), _), (_, (t_qa, _, _), _) = args[0], args[1]
        return qa_position_shifts(text_rng, s_qa.shape[0], max(s_qa.shape[1], t_qa.shape[1]), max_seq,
                                  cfg.qa_position_jitter)

    specs = [s.spec for s in studies] if labeled else []
    student.train()
    t_step = time.perf_counter()
    for step in range(start_step, cfg.steps):
        idx = order_rng.sample(range(len(studies)), min(cfg.batch_studies, len(studies)))
        texts = [study_targets(studies[i], text_rng, cfg.qa_per_study) for i in idx]
        swapped = counterfactual_rows(texts, specs, cfg.counterfactual_reports, text_rng) if labeled else set()
        args = batch_for([studies[i] for i in idx], texts, [t_patch[i] for i in idx], [t_visual[i] for i in idx])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)  # type: ignore[arg-type]  # same schedule fields as TrainConfig
        report_weights = impression_weights([t[0][1] for t in texts], args[0][1][1], tokenizer,
                                            cfg.impression_weight, cfg.positive_impression_weight, swapped)
        with autocast:
            losses = distill_losses(student, teacher, projections, cfg, *args, labeled=labeled,
                                    sentence_ends=sentence_ends, qa_shift=qa_shift_for(args),
                                    report_weights=report_weights,
                                    **probes_for(None if findings is None else findings[idx]))
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], cfg.grad_clip)
        optimizer.step()
        record: dict[str, Any] = {"step": step + 1, **{k: round(v.item(), 4) for k, v in losses.items()},
                                  "lr": lr_at(step, cfg), "s_per_step": round(time.perf_counter() - t_step, 3)}
        t_step = time.perf_counter()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            student.eval()
            if heldout is not None:
                with torch.no_grad(), autocast:
                    h = distill_losses(student, teacher, projections, cfg, *batch_for(*heldout), labeled=True,
                                       sentence_ends=sentence_ends, **probes_for(heldout_findings))
                record["heldout"] = {k: round(v.item(), 4) for k, v in h.items()}
            if evaluate is not None:
                record["eval"] = evaluate(student, tokenizer, student_cfg)
            student.train()
            log(f"step {step + 1}: " + json.dumps({k: record[k] for k in ("heldout", "eval") if k in record}))
        history.append(record)
        if (step + 1) % cfg.log_every == 0:
            terms = ", ".join(f"{k} {record[k]:.4f}" for k in ("total", "kl", "ce", "seq", "vision", "hidden", "probe",
                                                                 "pooled_probe") if k in record)
            log(f"step {step + 1}/{cfg.steps}: {terms}, lr {record['lr']:.2e}, {record['s_per_step']:.2f} s/step")
        if progress:
            progress(step + 1, cfg.steps, record)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            state = {"student": student.state_dict(), "projections": projections.state_dict(),
                     "decoder_probe": probe_head.state_dict(), "pooled_probe": pooled_head.state_dict(),
                     "optimizer": optimizer.state_dict(), "step": step + 1, "history": json.dumps(history),
                     "init": json.dumps(init)}
            atomic_write(last, lambda p, s=state: torch.save(s, p))

    student.eval()
    extra = {
        "distillation": {
            "command": " ".join(shlex.quote(a) for a in sys.argv), "config": asdict(cfg),
            "teacher": {"path": str(cfg.teacher), "sha256": file_sha256(cfg.teacher) if Path(cfg.teacher).is_file()
                        else None, "name": teacher_cfg.name},
            "init": {k: init[k] for k in init if k != "copied"} | {"copied": sorted(init["copied"])},
            "final": history[-1] if history else None,
            "heldout_seed_start": HELDOUT_SEED_START,
        },
        **cfg.extra,
    }
    final = save_checkpoint(student, out_dir / "model.safetensors", tokenizer.to_str(), extra, dtype=torch.float16)
    atomic_write(out_dir / "history.json", lambda p: p.write_text(json.dumps(history, indent=1)))
    return final


def heldout_set(cfg: DistillConfig, student_cfg: MedVLMConfig, teacher_cfg: MedVLMConfig, teacher: MedVLM,
                device: torch.device, autocast: Any) -> tuple | None:
    """A fixed batch of held-out synthetic studies (ground-truth texts) for the held-out KL and CE."""
    if cfg.heldout_studies <= 0:
        return None
    rng = random.Random(cfg.seed)
    shared = same_input(student_cfg, teacher_cfg)
    members, texts = [], []
    for seed in range(HELDOUT_SEED_START, HELDOUT_SEED_START + cfg.heldout_studies):
        vol, spec = render_study(seed, student_cfg)
        t_vol = None if shared else torch.from_numpy(render_study(seed, teacher_cfg)[0]).half()
        members.append(TrainStudy(spec.study_id, torch.from_numpy(vol).half(), t_vol, spec=spec))
        texts.append(study_texts(spec, rng, cfg.qa_per_study))
    patch, visual = teacher_features(teacher, members, student_cfg.vision.grid, device, cfg.feature_batch, autocast)
    return members, texts, patch, visual
