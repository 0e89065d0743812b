"""Training a MedVLM on synthetic chest CT studies (report generation and question answering mixed).

The vision encoder is the expensive part on a CPU, so each step encodes a batch of studies once and
trains the decoder on several sequences per study (its report and a few question-answer pairs) that
share those visual tokens. Volumes are rendered straight at the model grid (the phantom is defined in
millimetres, so this equals resampling a native series) and cached, because rendering thousands of
512x512 series would dominate a CPU run. The same loop runs on CUDA with bf16 autocast.

Study seeds: training draws from [0, HELDOUT_SEED_START); evaluation uses seeds from HELDOUT_SEED_START
on, which training never sees.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgevlm.checkpoint import atomic_write, save_checkpoint
from edgevlm.errors import EdgeVLMError
from edgevlm.models import PRESETS, MedVLM, MedVLMConfig
from edgevlm.models.tokenizer import SpecialIds, encode_prompt, special_ids, train_tokenizer

HELDOUT_SEED_START = 1_000_000
REPORT_QUESTIONS = (
    "Write the radiology report for this CT.",
    "Generate a report for this chest CT.",
    "Describe the findings of this CT scan.",
)


@dataclass
class TrainConfig:
    model: str = "demo-tiny"  # a preset name or a MedVLMConfig JSON file
    steps: int = 2400
    batch_studies: int = 8
    qa_per_study: int = 6  # question-answer pairs per study and step, besides the report
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    n_train_studies: int = 2400  # distinct studies rendered once and cached
    vocab_size: int = 1024
    tokenizer_corpus_studies: int = 1500
    eval_every: int = 400
    eval_studies: int = 24
    checkpoint_every: int = 200
    log_every: int = 50
    # Weight of the training-only finding head (0: off). The head is not part of the saved model.
    aux_weight: float = 1.0
    center_input: bool = True  # see CenteredPatchInput
    report_loss: str = "sentence"  # "sentence": mean over sentences (see loss_on); "token": mean over tokens
    # Each QA row's text is moved 0..qa_position_jitter rotary positions away from the visual tokens
    # (see text_rope_positions); 0 disables it.
    qa_position_jitter: int = 256
    # Weight of the training-only lesion heads (0: off; see LesionHeads and lesion_patch_targets).
    lesion_weight: float = 1.0
    # Staged recipe (0: off, everything trains jointly from step 0). The first vision_steps steps train
    # only the vision encoder and projector, on the finding and lesion heads (no text): see
    # `vision_stage_loss`. The remaining steps freeze the encoder, encode every training study once,
    # and train projector + decoder on reports and QAs over those cached tokens.
    vision_steps: int = 0
    vision_batch_studies: int = 16
    vision_lr: float = 1e-3
    # Weight of the training-only decoder probe (0: off; see DecoderProbe).
    decoder_probe_weight: float = 1.0
    # A trained edgevlm checkpoint to continue from instead of a fresh model: its config, tokenizer and
    # weights (`model` is then ignored). Its encoder runs frozen in the text stage, as in the staged
    # recipe, after `vision_steps` more steps on the training-only heads (0: none). Why: a change to the
    # text losses (`impression_weight`) is measured in ~1,000 text steps on a trained teacher, instead
    # of a 50-minute run from scratch.
    init: str = ""
    # Report-loss weight of the tokens of each structured-impression answer (where the report decides
    # presence, side, lobe and size; `impression_weights`) against its other tokens, times
    # positive_impression_weight where the finding is present. 1 and 1: every token alike.
    impression_weight: float = 1.0
    positive_impression_weight: float = 1.0
    # Fraction of text-stage report rows whose report is another training study's (`counterfactual_report`),
    # its impression answers unweighted: the findings text is taught to follow the impression above it.
    counterfactual_reports: float = 0.0
    # "auto": bf16 autocast on CUDA, fp32 on the CPU; "bf16": bf16 autocast on either (on a CPU with
    # bf16 matrix units, AMX or AVX512-BF16, measured 1.7x faster per ViT step); "fp32": never.
    autocast: str = "auto"
    render_workers: int = 2
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def model_config(self) -> MedVLMConfig:
        if self.model in PRESETS:
            return PRESETS[self.model]()
        return MedVLMConfig.from_json(Path(self.model).read_text())


# ------------------------------------------------------------------------------------------- data


def model_recipe(cfg: MedVLMConfig) -> Any:
    """The preprocessing recipe a model config names (a preset name or the recipe itself)."""
    from edgevlm.preprocess import Recipe, get_recipe

    return Recipe.from_dict(cfg.preprocess) if isinstance(cfg.preprocess, dict) else get_recipe(cfg.preprocess)


def render_study(seed: int, cfg: MedVLMConfig) -> tuple[np.ndarray, Any]:
    """(preprocessed volume (D, H, W) float32 at the model grid, StudySpec) for one study seed."""
    from edgevlm.data import sample_study

    spec = sample_study(seed)
    return render_spec(spec, cfg), spec


# Sub-samples per grid voxel along z and in-plane (`render_spec`): measured against the native path on
# held-out studies, (4, 2) cut the mean |difference| from 0.0097 to 0.0057 window units (p99.9 0.21 -> 0.14);
# (8, 4) reached 0.0044 at ~10x the cost. A training render costs 0.27 s a study (median, render and
# preprocess; 0.017 s point-sampled): `python benchmarks/render.py`.
SUPERSAMPLE_MAX = (4, 2)


def render_spec(spec: Any, cfg: MedVLMConfig) -> np.ndarray:
    """The preprocessed volume (D, H, W) float32 of a StudySpec at the model grid.

    Stands in for writing the native series and preprocessing it, at a fraction of the cost: the
    phantom is rendered on the grid the recipe's resampling would produce from the native series
    (same extent, same voxel centres, including the half-voxel offsets of the crop/pad), and the recipe
    itself does the rest. An antialiasing recipe box-averages the native voxels a grid voxel covers
    (8 slices of 1.25 mm in one 10 mm slice): partial volume, which point sampling at the voxel centres
    lacks. So each grid voxel is the mean of up to SUPERSAMPLE_MAX sub-samples per axis, clipped to the
    window first as the native path does. Why: trained on point-sampled volumes, a model met the
    native path's thin pleural air rims for the first time at evaluation (pneumothorax yes/no AUC 0.88
    on point-sampled held-out volumes, 0.47 on the same studies through the native path).
    Checked against the native path in tests/test_train.py.
    """
    from edgevlm.data import render_volume
    from edgevlm.preprocess import preprocess, resampled_shape
    from edgevlm.volume import Volume

    recipe = model_recipe(cfg)
    if recipe.spacing_mm is None:
        raise ValueError("training renders at the recipe spacing: the recipe must set spacing_mm")
    native_shape, native_mm = spec.native_shape_zyx, spec.native_spacing_mm
    shape = resampled_shape(native_shape, native_mm, recipe.spacing_mm)  # the same extent, as the recipe does
    spacing_mm = tuple(n * s / m for n, s, m in zip(native_shape, native_mm, shape, strict=True))
    # Resampled voxel i is centred at origin - s/2 + (i + 1/2) s' (align_corners=False); LPS is (x, y, z).
    ox, oy, oz = spec.native_origin_mm()
    origin_mm = (ox + (spacing_mm[2] - native_mm[2]) / 2, oy + (spacing_mm[1] - native_mm[1]) / 2,
                 oz + (spacing_mm[0] - native_mm[0]) / 2)
    # The native path box-averages floor(f) voxels along an axis shrunk by f >= 2 (preprocess.py).
    sub = [1] * 3
    if recipe.antialias:
        for axis, cap in ((0, SUPERSAMPLE_MAX[0]), (1, SUPERSAMPLE_MAX[1]), (2, SUPERSAMPLE_MAX[1])):
            factor = spacing_mm[axis] / native_mm[axis]
            sub[axis] = min(cap, int(factor)) if factor >= 2 else 1
    sub_mm = tuple(s / k for s, k in zip(spacing_mm, sub, strict=True))
    # Sub-sample j of voxel i sits at origin - s/2 + i s + (j + 1/2) s / k; origin_mm is (x, y, z).
    sub_origin = tuple(o - s / 2 + t / 2 for o, s, t in zip(origin_mm, spacing_mm[::-1], sub_mm[::-1], strict=True))
    hu = render_volume(spec, tuple(n * k for n, k in zip(shape, sub, strict=True)), sub_mm, sub_origin)
    if sub != [1, 1, 1]:
        if recipe.intensity == "window":
            np.clip(hu, *recipe.window, out=hu)
        d, h, w = shape
        hu = hu.reshape(d, sub[0], h, sub[1], w, sub[2]).mean((1, 3, 5), dtype=np.float32)
    return preprocess(Volume(hu, spacing_mm, origin_mm), recipe)


def _render_worker(args: tuple[int, MedVLMConfig]) -> tuple[np.ndarray, Any]:
    torch.set_num_threads(1)
    return render_study(*args)


# What the per-patch lesion heads mark: the focal findings, and effusion, which is not focal, but a
# per-patch target says where the fluid is, so the visual tokens carry its side (with the study-level
# finding head alone the reports' effusion side stayed near its prior). Cardiomegaly and emphysema are
# diffuse, in fixed places, and the per-study finding head learns them quickly.
LESION_TYPES = ("nodule", "mass", "consolidation", "pneumothorax", "pleural_effusion")
# A patch holds a lesion when removing the finding moves one of its voxels by more than this (0.05 of
# the demo-chest window [-1000, 600] HU = 80 HU), which leaves out the faint partial-volume fringe.
# Measured on the 1,600 training studies: every study with a focal finding gets a target (nodule 2.5
# patches on average, mass 6.8, consolidation 10.9, pneumothorax 52 of 512).
LESION_DELTA = 0.05


def lesion_patch_targets(spec: Any, volume: np.ndarray, cfg: MedVLMConfig) -> np.ndarray:
    """(num_patches, len(LESION_TYPES)) uint8: the ViT patches each focal finding type occupies.

    Rendered rather than drawn from the finding geometry: the study is rendered again without that
    type and every patch with a voxel that changes by more than LESION_DELTA counts, so the target is
    exactly what the encoder sees (partial volume, clipping to the lung, pneumothorax shapes).
    `volume` is the study's own render at the model grid (the cached fp16 one is precise enough).
    """
    return patch_targets_from_masks(lesion_voxel_masks(spec, volume, cfg), cfg)


def patch_targets_from_masks(masks: np.ndarray, cfg: MedVLMConfig) -> np.ndarray:
    """(types, D, H, W) voxel masks -> (num_patches, types) uint8: a patch counts if any voxel does."""
    from edgevlm.models.vision import patchify

    patches = patchify(torch.from_numpy(masks)[:, None], cfg.vision.patch_size).any(-1)  # (types, N)
    return patches.T.numpy().astype(np.uint8)


def lesion_voxel_masks(spec: Any, volume: np.ndarray, cfg: MedVLMConfig,
                       types: tuple[str, ...] = LESION_TYPES) -> np.ndarray:
    """(len(types), D, H, W) bool at the model grid: the voxels each focal finding type moves by more
    than LESION_DELTA (the study rendered again without that type; see lesion_patch_targets)."""
    import dataclasses

    volume = np.asarray(volume, np.float32)
    out = np.zeros((len(types), *volume.shape), dtype=bool)
    for j, kind in enumerate(types):
        if any(f.type == kind for f in spec.findings):
            without = dataclasses.replace(spec, findings=[f for f in spec.findings if f.type != kind])
            out[j] = np.abs(volume - render_spec(without, cfg)) > LESION_DELTA
    return out


def _lesion_worker(args: tuple[Any, np.ndarray, MedVLMConfig]) -> np.ndarray:
    torch.set_num_threads(1)
    return lesion_patch_targets(*args)


class LesionHeads(torch.nn.Module):
    """Training-only per-location lesion classifiers: one on the ViT patch tokens, one on the visual
    tokens the decoder reads (the projector's pooled cells, targets max-pooled the same way).

    Why both: the patch head teaches the encoder to see a lesion (nodule patch AUC 0.58 -> 0.92 in 800
    steps), but the spp projector averages 8 patches per visual token, and the decoder still read
    nodules at chance (teacher-forced impression AUC 0.60 for nodule at step 4200): the cell head makes
    the lesion survive the pooling, in the tokens the decoder actually attends to.
    """

    def __init__(self, vision_dim: int, decoder_dim: int, n_types: int):
        super().__init__()
        self.patch = torch.nn.Linear(vision_dim, n_types)
        self.cell = torch.nn.Linear(decoder_dim, n_types)


def cell_targets(patch_targets: torch.Tensor, grid: tuple[int, int, int], pool: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, T) per-patch targets -> (B, M, T) per visual token, pooled like the spp projector (max)."""
    b, _, t = patch_targets.shape
    x = patch_targets.transpose(1, 2).reshape(b, t, *grid)
    return F.max_pool3d(x, kernel_size=pool, stride=pool).flatten(2).transpose(1, 2)


def lesion_loss(head: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-location multi-label BCE of a lesion head on its tokens (see `lesion_bce`)."""
    return lesion_bce(head(tokens), targets)


def lesion_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-location multi-label BCE (positives weighted: a nodule is 1-2 of 512 patches)."""
    pos_weight = torch.full((targets.shape[-1],), 20.0, device=targets.device)
    return F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=pos_weight)


def study_texts(spec: Any, rng: random.Random, n_qa: int) -> tuple[tuple[str, str], list[tuple[str, str]]]:
    """One study's (report question, report) pair and up to n_qa (question, answer) pairs."""
    from edgevlm.data.reports import questions, report_text

    np_rng = np.random.default_rng(rng.randrange(2**32))
    report = (rng.choice(REPORT_QUESTIONS), report_text(spec, np_rng))
    qas = questions(spec, np_rng)
    return report, [(qa.question, qa.answer) for qa in rng.sample(qas, min(n_qa, len(qas)))]


def build_tokenizer(cfg: TrainConfig, model_cfg: MedVLMConfig):
    from edgevlm.data import sample_study
    from edgevlm.data.reports import questions, report_text

    corpus = []
    for seed in range(cfg.tokenizer_corpus_studies):
        spec = sample_study(seed)
        rng = np.random.default_rng(seed)
        corpus.append(report_text(spec, rng))
        corpus.extend(f"{qa.question} {qa.answer}" for qa in questions(spec, rng))
    corpus.extend(REPORT_QUESTIONS)
    specials = [model_cfg.prompt.pad_token, model_cfg.prompt.bos_token or "<s>", *model_cfg.prompt.eos_tokens,
                "<unk>", model_cfg.prompt.image_token]
    return train_tokenizer(corpus, cfg.vocab_size, specials)


def sequence_batch(pairs: list[tuple[str, str]], tokenizer: Any, model_cfg: MedVLMConfig, ids: SpecialIds,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (-100 outside the answer + EOS) for prompt/answer pairs."""
    rows, labels = [], []
    for question, answer in pairs:
        prompt = encode_prompt(tokenizer, model_cfg, question)
        target = [*tokenizer.encode(" " + answer, add_special_tokens=False).ids, ids.stop[0]]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(len(r) for r in rows)
    if width > model_cfg.decoder.max_seq_len:
        raise ValueError(f"a training sequence has {width} tokens, over max_seq_len {model_cfg.decoder.max_seq_len}")
    input_ids = torch.full((len(rows), width), ids.pad, dtype=torch.long)
    label_ids = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(r)] = torch.tensor(r)
        label_ids[i, : len(lab)] = torch.tensor(lab)
    return input_ids.to(device), label_ids.to(device)


def counterfactual_report(texts: tuple[tuple[str, str], list], specs: list, rng: random.Random
                          ) -> tuple[tuple[str, str], list]:
    """`study_texts`' output with its report swapped for a random training study's report.

    Why: a generated report's FINDINGS text contradicted its own IMPRESSION (held-out, the teacher with
    decision thresholds: "Lung mass: 61 mm, right lower lobe." then "No lung mass."; 6 of 10 masses called
    in the impression, 0 in the findings, which `edgevlm eval` reads). Trained on true reports alone, the
    findings text can follow the image instead of the impression and agree with it by construction. On a
    swapped report the image no longer backs the impression, so its answers are left out of the loss
    (`impression_weights`' `counterfactual` rows) and what is left to learn is findings text that follows
    the impression it reads.
    """
    from edgevlm.data.reports import report_text

    (question, _), qas = texts
    other = specs[rng.randrange(len(specs))]
    return (question, report_text(other, np.random.default_rng(rng.randrange(2**32)))), qas


def counterfactual_rows(texts: list, specs: list, fraction: float, rng: random.Random) -> set[int]:
    """Swap each of `texts`' reports for a random study's of `specs` with probability `fraction`, in place
    (`counterfactual_report`); returns the swapped rows. Draws nothing at 0, so runs without it keep
    their text sequence."""
    if fraction <= 0:
        return set()
    swapped = {row for row in range(len(texts)) if rng.random() < fraction}
    for row in sorted(swapped):
        texts[row] = counterfactual_report(texts[row], specs, rng)
    return swapped


def impression_weights(reports: list[str], labels: torch.Tensor, tokenizer: Any, weight: float,
                       positive_weight: float, counterfactual: set[int] | frozenset[int] = frozenset()
                       ) -> torch.Tensor | None:
    """(B, T) report-loss weights for `sequence_batch`'s labels of `reports`: 1, and on the tokens of each
    structured-impression answer (`impression_answers`) `weight`, times `positive_weight` where the
    finding is present, 0 in the rows `counterfactual` names (`counterfactual_report`); None when all is 1.

    Why: teacher-forced on true reports, the candidate teacher ranked mass and consolidation studies at
    AUC 0.97-0.98 from P(" none") at the decision token, yet its greedy reports found 0 of 10 masses
    and 63% of consolidations (benchmarks/decision_tokens.py): a decision is one token of a seven-token
    sentence, and its log loss, calibrated to base rates of 5-20%, keeps P(present) under one half for
    most positives. `weight` gives the decisions more of the gradient; `positive_weight` w moves the
    greedy call from P > 1/2 to P > 1/(1 + w), where a rare finding's F1 is better served.
    """
    from edgevlm.data.reports import impression_answers

    if weight == 1.0 and positive_weight == 1.0 and not counterfactual:
        return None
    out = torch.ones(labels.shape)
    for row, report in enumerate(reports):
        text = " " + report  # the training target, as `sequence_batch` encodes it
        try:
            answers = impression_answers(text)
        except ValueError:  # a teacher-written report (distillation) without every impression line
            continue
        offsets = tokenizer.encode(text, add_special_tokens=False).offsets
        first = int((labels[row] != -100).nonzero()[0])  # the target's first token
        for start, stop, present in answers:
            w = 0.0 if row in counterfactual else weight * (positive_weight if present else 1.0)
            for k, (a, _) in enumerate(offsets):
                if start <= a < stop:
                    out[row, first + k] = w
    return out.to(labels.device)


# ---------------------------------------------------------------------------------------- training


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warmup then cosine; with the staged recipe each stage has its own schedule (and peak LR)."""
    peak, start, end = cfg.lr, 0, cfg.steps
    if getattr(cfg, "vision_steps", 0) > 0:  # DistillConfig shares this schedule, without stages
        peak, start, end = ((cfg.vision_lr, 0, cfg.vision_steps) if step < cfg.vision_steps
                            else (cfg.lr, cfg.vision_steps, cfg.steps))
    step -= start
    warmup = min(cfg.warmup_steps, max(1, (end - start) // 4))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, end - start - warmup)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def answer_outputs(model: MedVLM, visual: torch.Tensor, reports: tuple[torch.Tensor, torch.Tensor],
                   qas: tuple[torch.Tensor, torch.Tensor, torch.Tensor], image_id: int,
                   qa_shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (K, vocab), final hidden states (K, dim), target ids (K,)) at the K answer positions.

    Position t predicts token t + 1; only answer + EOS tokens (labels != -100) count. Reports and the
    (short) QA sequences are separate batches so QAs are not padded to report length. `qas` is
    (input ids, labels, owner) with owner[i] the study index of QA row i; `visual` (B, M, dim) is
    computed once per study; `qa_shift` moves the QA text's rotary positions (`text_rope_positions`).
    Used by distillation (KL, feature matching); positions come out in `answer_weights`' order.
    """
    logits_k, hidden_k, targets_k = [], [], []
    for input_ids, labels, vis, shift in ((*reports, visual, None), (qas[0], qas[1], visual[qas[2]], qa_shift)):
        if input_ids.shape[0] == 0:
            continue
        rope_pos = None if shift is None else text_rope_positions(input_ids, image_id, shift)
        logits, hidden = model.decoder(model.embed(input_ids, vis, image_id), rope_pos=rope_pos, return_hidden=True)
        answer = labels[:, 1:] != -100  # (B, T-1)
        logits_k.append(logits[:, :-1][answer])
        hidden_k.append(hidden[:, :-1][answer])
        targets_k.append(labels[:, 1:][answer])
    if not logits_k:
        vocab, dim = model.cfg.decoder.vocab_size, model.cfg.decoder.dim
        return visual.new_zeros(0, vocab), visual.new_zeros(0, dim), visual.new_zeros(0, dtype=torch.long)
    return torch.cat(logits_k), torch.cat(hidden_k), torch.cat(targets_k)


def answer_weights(report_labels: torch.Tensor, qa_labels: torch.Tensor,
                   sentence_ends: torch.Tensor | None = None,
                   report_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(K,) weights over `answer_outputs`' K positions: `loss_on`'s weighting as weights.

    Half the mass to the reports, half to the QAs (all of it to whichever is present alone). Report
    positions share their half per token, or with `sentence_ends` equally per sentence and within a
    sentence per token; each QA answer gets an equal share, split over its tokens. Why: the same
    reason as in `loss_on`; the few image-dependent report tokens must not drown in boilerplate.
    They sum to 1 unless `report_weights` ((B, T) like the report labels, `impression_weights`) scale
    report positions, as they scale `loss_on`'s report tokens (no renormalization, the same there).
    """
    parts = []
    for labels, per in ((report_labels, "sentence" if sentence_ends is not None else "token"), (qa_labels, "row")):
        targets = labels[:, 1:]
        valid = targets != -100
        if not valid.any():
            parts.append(torch.zeros(0, device=labels.device))
            continue
        if per == "token":
            group = torch.zeros_like(targets)
        elif per == "row":
            group = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)
        else:
            group = sentence_keys(targets, sentence_ends)
        _, key, counts = torch.unique(group[valid], return_inverse=True, return_counts=True)
        parts.append(1.0 / (counts[key].float() * len(counts)))
    if report_weights is not None and parts[0].numel():
        parts[0] = parts[0] * report_weights[:, 1:][report_labels[:, 1:] != -100].to(parts[0])
    present = [p for p in parts if p.numel()]
    return torch.cat([p / len(present) for p in parts]) if present else torch.zeros(0)


def sentence_end_table(tokenizer: Any) -> torch.Tensor:
    """(vocab,) bool: the token closes a sentence (holds a full stop or a line break)."""
    vocab = tokenizer.get_vocab_size()
    return torch.tensor([any(c in tokenizer.decode([i], skip_special_tokens=False) for c in ".\n")
                         for i in range(vocab)])


def sentence_keys(targets: torch.Tensor, sentence_ends: torch.Tensor) -> torch.Tensor:
    """(B, T) ids in 0..B*(T+1)-1, one per sentence of each row; targets -100 where ignored, a sentence
    runs up to and including a token of `sentence_ends`."""
    ends = sentence_ends.to(targets.device)[targets.clamp(min=0)] & (targets != -100)
    sentence = torch.cumsum(ends.long(), 1) - ends.long()  # the closing token belongs to its sentence
    return torch.arange(targets.shape[0], device=targets.device)[:, None] * (targets.shape[1] + 1) + sentence


def sentence_mean(per_token: torch.Tensor, targets: torch.Tensor, sentence_ends: torch.Tensor) -> torch.Tensor:
    """Mean over sentences of each sentence's mean token loss. `per_token` and `targets` are (B, T)
    (targets -100 where ignored); sentences as in `sentence_keys`."""
    valid = targets != -100
    width = targets.shape[1] + 1
    key = sentence_keys(targets, sentence_ends)[valid]
    sums = per_token.new_zeros(targets.shape[0] * width).index_add_(0, key, per_token[valid])
    counts = per_token.new_zeros(targets.shape[0] * width).index_add_(0, key, torch.ones_like(per_token[valid]))
    present = counts > 0
    return (sums[present] / counts[present]).mean()


def qa_position_shifts(rng: random.Random, n_rows: int, width: int, max_seq_len: int,
                       jitter: int) -> torch.Tensor | None:
    """Random rotary offsets 0..jitter for n_rows QA rows of `width` tokens (`text_rope_positions`),
    bounded so the shifted text stays inside the RoPE table; None when off or there are no rows."""
    if jitter <= 0 or n_rows == 0:
        return None
    most = max(0, min(jitter, max_seq_len - width))
    return torch.tensor([rng.randint(0, most) for _ in range(n_rows)])


def text_rope_positions(input_ids: torch.Tensor, image_id: int, shift: torch.Tensor) -> torch.Tensor:
    """Rotary positions (B, T): 0..T-1, plus shift[b] for every token after row b's last image token.

    Why: with RoPE an attention head that reads the visual tokens learns it at the relative distances
    it was trained on. QA answers sit 15-80 positions after the visual tokens, the findings in a report
    80-330; measured on the interim teacher, moving a question 40 positions further from the image
    dropped its cardiomegaly yes/no AUC from 1.00 to 0.05 (edgevlm/assets/demo-teacher.json, history),
    which is why its reports ignored the image while its answers did not. Training QAs at
    random distances teaches reading the image from anywhere in a report; the text keeps its own
    relative positions, and inference is unchanged (plain 0..T-1 positions).
    """
    t = input_ids.shape[1]
    idx = torch.arange(t, device=input_ids.device)
    is_image = input_ids == image_id
    last_image = torch.where(is_image, idx, torch.full_like(idx, -1)).amax(1, keepdim=True)  # (B, 1)
    return idx[None] + shift[:, None].to(idx) * (idx[None] > last_image)


def loss_on(model: MedVLM, volumes: torch.Tensor, reports: tuple[torch.Tensor, torch.Tensor],
            qas: tuple[torch.Tensor, torch.Tensor, torch.Tensor], image_id: int,
            aux: tuple[torch.nn.Module, torch.Tensor, float] | None = None,
            sentence_ends: torch.Tensor | None = None, qa_shift: torch.Tensor | None = None,
            lesion_aux: tuple[torch.nn.Module, torch.Tensor, float] | None = None,
            patch_tokens: torch.Tensor | None = None,
            decoder_probe: tuple[torch.nn.Module, torch.Tensor, float] | None = None,
            report_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Half report loss (mean over report tokens, or over sentences with `sentence_ends`), half QA loss
    (mean over questions of each answer's mean token loss); the visual tokens are computed once per study.

    Why the split: a report is ~100 tokens of which a handful depend on the image, while a short
    answer ("yes", "left", "12 mm") is all image. Weighting per token lets the decoder reach a low loss
    on language alone and leaves the vision encoder with almost no gradient; weighting each answer as a
    unit makes looking at the volume pay from the start.
    `qas` is (input ids, labels, owner) with owner[i] the study index of QA row i.
    `aux` (training only): (finding head, targets (B, L), weight) adds a multi-label finding loss on the
    vision tokens, a direct signal that gets the encoder off the ground (see `finding_targets`).
    `sentence_ends` (`sentence_end_table`) makes the report loss a mean over sentences instead of
    tokens, for the same reason as the per-answer QA loss: in a report the one sentence that depends on
    the image ("The heart is enlarged.") is a few tokens among ~150 of boilerplate; measured, a
    token-mean report loss left reports blind to findings the same model answered questions about
    perfectly (cardiomegaly yes/no AUC 1.00, finding F1 in reports 0.0).
    `qa_shift` (training only, (B_qa,) ints): rotary offsets of the QA text (`text_rope_positions`).
    `lesion_aux` (training only): (LesionHeads, per-patch targets (B, N, len(LESION_TYPES)), weight) adds
    the lesion loss on the ViT patch tokens and, for spp projectors, on the pooled visual tokens: a
    nodule is a few voxels of one patch, and a study-level label alone left focal findings at chance
    (finding-head AUC ~0.55 for mass and nodule at step 2200).
    `patch_tokens` (B, N, vision_dim): the frozen encoder's output, cached (the staged recipe's second
    stage); `volumes` is then unused and the patch lesion head, which would only train itself, is skipped.
    `decoder_probe` (training only): (DecoderProbe, finding targets (B, L), weight) adds a multi-label
    finding loss on the decoder's final hidden state at every answer position of every sequence
    (`DecoderProbe`).
    `report_weights` (training only, (B, T) like the report labels): per-token weights of the report
    loss (`impression_weights`).
    """
    frozen = patch_tokens is not None
    tokens = patch_tokens if frozen else model.vision.patch_tokens(volumes)  # (B, N, vision_dim)
    visual = model.projector(tokens)  # (B, M, dim): what encode_image returns

    probe_terms: list[torch.Tensor] = []

    def token_losses(input_ids: torch.Tensor, labels: torch.Tensor, vis: torch.Tensor,
                     shift: torch.Tensor | None = None, owner: torch.Tensor | None = None) -> torch.Tensor:
        rope_pos = None if shift is None else text_rope_positions(input_ids, image_id, shift)
        logits, hidden = model.decoder(model.embed(input_ids, vis, image_id), rope_pos=rope_pos, return_hidden=True)
        if decoder_probe is not None:
            head, targets, _ = decoder_probe
            answer = labels[:, 1:] != -100  # the positions that predict an answer token
            rows = targets if owner is None else targets[owner]
            probe_terms.append(F.binary_cross_entropy_with_logits(
                head(hidden[:, :-1][answer]).float(), rows[:, None].expand(-1, answer.shape[1], -1)[answer]))
        # position t predicts token t + 1; (N, T-1) losses, 0 where ignored
        return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=-100,
                               reduction="none")

    report_ids, report_labels = reports
    per_token = token_losses(report_ids, report_labels, visual)
    if report_weights is not None:
        per_token = per_token * report_weights[:, 1:].to(per_token)
    if sentence_ends is not None:
        report_loss = sentence_mean(per_token, report_labels[:, 1:], sentence_ends)
    else:
        report_loss = per_token.sum() / (report_labels[:, 1:] != -100).sum().clamp(min=1)
    qa_ids, qa_labels, owner = qas
    loss = report_loss
    if qa_ids.shape[0] > 0:
        per_token = token_losses(qa_ids, qa_labels, visual[owner], qa_shift, owner)
        per_answer = per_token.sum(1) / (qa_labels[:, 1:] != -100).sum(1).clamp(min=1)
        loss = 0.5 * report_loss + 0.5 * per_answer.mean()
    if aux is not None:
        head, targets, weight = aux
        loss = loss + weight * F.binary_cross_entropy_with_logits(head(visual).float(), targets)
    if lesion_aux is not None:
        heads, targets, weight = lesion_aux
        if not frozen:
            loss = loss + weight * lesion_loss(heads.patch, tokens, targets)
        if model.cfg.projector.kind == "spp":
            cells = cell_targets(targets, model.cfg.vision.grid, model.cfg.projector.pool)
            loss = loss + weight * lesion_loss(heads.cell, visual, cells)
    if probe_terms:
        loss = loss + decoder_probe[2] * torch.stack(probe_terms).mean()
    return loss


def vision_stage_loss(model: MedVLM, volumes: torch.Tensor, finding_head: torch.nn.Module, findings: torch.Tensor,
                      lesion_heads: LesionHeads | None, lesions: torch.Tensor | None) -> torch.Tensor:
    """The staged recipe's first stage: encoder + projector trained on the training-only heads alone.

    Finding head on the visual tokens (`finding_targets`), lesion heads per patch and per visual token
    (`lesion_loss`), and a study-level term per focal type: the most lesion-like visual token of a study
    must say whether the study has that lesion at all (max over tokens, multiple-instance style), which
    teaches the head not to fire on the vessels and ribs of a normal chest. Why a stage without text:
    jointly trained, the decoder's language loss dominates for thousands of steps and the encoder learns
    focal findings slowly (the previous interim teacher after 5,400 steps: probe AUC nodule 0.56, mass 0.64,
    consolidation 0.61); the encoder alone, on these heads, reached held-out study AUC mass 0.87,
    consolidation 0.94, pneumothorax 0.97 in 1,000 steps (8 minutes on 2 cores in bf16;
    benchmarks/results/train-staged-demo-tiny.json). Each term has weight 1 (the stage has no other loss
    to balance); the finding head is always on here, --lesion-weight 0 turns the lesion heads off.
    """
    tokens = model.vision.patch_tokens(volumes)
    visual = model.projector(tokens)
    loss = F.binary_cross_entropy_with_logits(finding_head(visual).float(), findings)
    if lesion_heads is not None and lesions is not None:
        loss = loss + lesion_loss(lesion_heads.patch, tokens, lesions)
        if model.cfg.projector.kind == "spp":
            cells = cell_targets(lesions, model.cfg.vision.grid, model.cfg.projector.pool)
            cell_logits = lesion_heads.cell(visual).float()
            loss = loss + lesion_bce(cell_logits, cells)
            loss = loss + F.binary_cross_entropy_with_logits(cell_logits.amax(1), lesions.amax(1))
    return loss


@torch.no_grad()
def encode_patches(model: MedVLM, volumes: list[torch.Tensor], batch: int, autocast: Any,
                   device: torch.device) -> torch.Tensor:
    """(n, N, vision_dim) fp16 patch tokens of the (frozen) encoder for every training volume."""
    out = []
    for i in range(0, len(volumes), batch):
        vols = torch.stack(volumes[i:i + batch]).float().unsqueeze(1).to(device)
        with autocast:
            out.append(model.vision.patch_tokens(vols).to(torch.float16).cpu())
    return torch.cat(out)


class FindingHead(torch.nn.Module):
    """Training-only multi-label finding classifier on the projector's visual tokens.

    It reads every visual token separately (a narrow per-token map, then all tokens flattened), so it
    can tie a finding to where it is: an effusion is fluid density at the lung base, which a
    position-blind feature cannot tell from the chest wall. Measured against a head on the mean and
    max over the tokens (same run otherwise): at step 600 that one's held-out AUCs were at chance
    (cardiomegaly 0.25), while with this one the decoder's yes/no answers reached held-out AUC 1.00
    for cardiomegaly and 0.86 for effusion by step 1200.
    """

    def __init__(self, n_tokens: int, dim: int, n_labels: int, width: int = 16):
        super().__init__()
        self.reduce = torch.nn.Linear(dim, width)
        self.classify = torch.nn.Linear(n_tokens * width, n_labels)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        return self.classify(F.gelu(self.reduce(visual)).flatten(1))


class DecoderProbe(torch.nn.Module):
    """Training-only multi-label finding classifier on the decoder's final hidden state (`finding_targets`),
    applied at every position that predicts an answer token, in reports and QAs alike.

    Why: the visual tokens can hold a finding perfectly (finding-head AUC 1.00 for cardiomegaly) while
    the decoder's answers about it stay near chance (yes/no accuracy 0.74 after 2,000 text steps on a
    frozen encoder): the language loss reaches a text position through a few image-dependent tokens per
    sequence, and only after the attention that reads the image has formed. This head asks every
    text position to know every finding, so gradient reaches the attention over the visual tokens from
    all of them at once. Measured (staged recipe, the same frozen encoder, 600 text steps each, 40
    held-out studies through the native path): teacher-forced yes/no AUC with the probe vs without,
    consolidation 0.94 vs 0.55, mass 1.00 vs 0.67, emphysema 0.71 vs 0.52, effusion 0.98 vs 0.97,
    cardiomegaly 0.77 vs 0.84; closed-question accuracy 0.61 vs 0.55.
    """

    def __init__(self, dim: int, n_labels: int):
        super().__init__()
        self.classify = torch.nn.Linear(dim, n_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classify(hidden)


class CenteredPatchInput(torch.nn.Module):
    """Parametrization of the vision position table that centres the input on the mean training volume.

    The synthetic findings are small deviations from an average anatomy; fed raw, the mean anatomy
    dominates every patch and a from-scratch ViT learns nothing for hundreds of steps (measured: finding
    AUCs stay at 0.5). Subtracting the per-voxel mean volume is exact to fold into the position table,
    since patch_embed(x - mu) = W x + b - W mu, so training uses pos_embed - W mu and the saved model
    is a plain ViT that takes the unmodified preprocessed volume.
    """

    def __init__(self, patch_embed: torch.nn.Linear, mean_patches: torch.Tensor):
        super().__init__()
        self.patch_embed = [patch_embed]  # a list: a reference, not a submodule (no duplicated weights)
        self.register_buffer("mean_patches", mean_patches)  # (1, N, patch_dim)

    def forward(self, pos_embed: torch.Tensor) -> torch.Tensor:
        return pos_embed - self.mean_patches @ self.patch_embed[0].weight.T


def prepare_for_training(model: MedVLM, mean_volume: torch.Tensor | None) -> None:
    """Initialization for training from scratch (a resumed run then loads its state over it).

    The residual branches of the vision blocks start at zero (their output projections are zeroed), so
    the encoder starts as patch embedding + norm and grows into its depth. With the default init each
    block adds an O(1) attention output that is nearly the same for every token (attention is uniform at
    init), which buries the small per-patch signal: the visual tokens collapsed to a study-independent
    constant within 100 steps. `mean_volume` (D, H, W) enables `CenteredPatchInput`.
    """
    from torch.nn.utils import parametrize

    from edgevlm.models.vision import patchify

    for block in model.vision.blocks:
        torch.nn.init.zeros_(block.attn.out_proj.weight)
        torch.nn.init.zeros_(block.mlp.linear2.weight)
    if mean_volume is not None:
        if model.cfg.vision.pos_embed != "learned":
            raise ValueError("input centering folds into a learned position table; this model has none")
        dtype = model.vision.patch_embed.weight.dtype
        mean_patches = patchify(mean_volume[None, None].to(dtype), model.cfg.vision.patch_size)
        parametrize.register_parametrization(model.vision, "pos_embed",
                                             CenteredPatchInput(model.vision.patch_embed, mean_patches))


def bake_parametrizations(model: MedVLM) -> None:
    """Fold `CenteredPatchInput` into the plain position table (the model then needs nothing extra)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(model.vision, "pos_embed"):
        parametrize.remove_parametrizations(model.vision, "pos_embed", leave_parametrized=True)


def mean_volume_of(volumes: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros(volumes[0].shape, dtype=torch.float64)
    for v in volumes:
        total += v.double()
    return (total / len(volumes)).float()


def finding_labels() -> tuple[str, ...]:
    """What the training-only finding head and decoder probe predict: each type present, and per type
    the lobes holding it (nodule, mass, consolidation) and the sides holding it (effusion, pneumothorax).

    Per type, not pooled: with one "side:left" label for effusion or pneumothorax alike, a study with a
    left effusion and a right pneumothorax asks for both sides of both, and the reports of the teacher
    trained that way lean to their prior side (held-out 100: an effusion called "right" in 10 of 17
    calls, the side correct in 8; edgevlm/assets/demo-teacher.json, history)."""
    from edgevlm.data.findings import FINDING_TYPES, LOBES

    return (*FINDING_TYPES,
            *(f"{kind}:{lobe}" for kind in LOBAR_TYPES for lobe in LOBES),
            *(f"{kind}:{side}" for kind in LATERAL_TYPES for side in ("left", "right")))


LOBAR_TYPES = ("nodule", "mass", "consolidation")
LATERAL_TYPES = ("pleural_effusion", "pneumothorax")


def finding_targets(spec: Any) -> torch.Tensor:
    """Multi-hot (L,) targets of `finding_labels()` for one study ("bilateral" sets both sides)."""
    labels = {name: i for i, name in enumerate(finding_labels())}
    target = torch.zeros(len(labels))
    for f in spec.findings:
        target[labels[f.type]] = 1.0
        if f.type in LOBAR_TYPES and f.lobe:
            target[labels[f"{f.type}:{f.lobe}"]] = 1.0
        if f.type in LATERAL_TYPES and f.side:
            for side in ("left", "right"):
                if f.side in (side, "bilateral"):
                    target[labels[f"{f.type}:{side}"]] = 1.0
    return target


def render_training_set(cfg: TrainConfig, model_cfg: MedVLMConfig, out_dir: Path, log: Callable[[str], None],
                        progress: Callable[[int, int, dict], None] | None) -> tuple[list[torch.Tensor], list[Any]]:
    """The cached training volumes (fp16) and their specs; rendered once per run folder, then reused
    on resume (`volumes.npy` beside the checkpoint: rendering is minutes, loading is seconds)."""
    from edgevlm.data import sample_study

    cache = out_dir / f"volumes-{cfg.n_train_studies}.npy"
    if cache.exists():
        array = np.load(cache, mmap_mode="r")
        log(f"loaded {len(array)} cached training volumes from {cache}")
        return [torch.from_numpy(np.array(a)) for a in array], [sample_study(s) for s in range(cfg.n_train_studies)]
    log(f"rendering {cfg.n_train_studies} training studies at the model grid")
    t0 = time.perf_counter()
    volumes, specs = [], []
    workers = max(1, min(cfg.render_workers, os.cpu_count() or 1))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        jobs = ((seed, model_cfg) for seed in range(cfg.n_train_studies))
        for vol, spec in pool.imap(_render_worker, jobs, chunksize=8):
            volumes.append(torch.from_numpy(vol).to(torch.float16))
            specs.append(spec)
            if progress:
                progress(len(specs), cfg.n_train_studies, {"phase": "render"})
    log(f"rendered in {time.perf_counter() - t0:.0f} s")
    save_npy(cache, torch.stack(volumes).numpy())
    return volumes, specs


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, atomically (a file object: np.save would append ".npy" to the temp name)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def lesion_training_targets(cfg: TrainConfig, model_cfg: MedVLMConfig, out_dir: Path, volumes: list[torch.Tensor],
                            specs: list[Any], log: Callable[[str], None],
                            progress: Callable[[int, int, dict], None] | None) -> torch.Tensor:
    """(n_train_studies, num_patches, len(LESION_TYPES)) uint8 lesion targets, cached beside the volumes."""
    cache = out_dir / f"lesions-{cfg.n_train_studies}.npy"
    if cache.exists():
        log(f"loaded cached lesion targets from {cache}")
        return torch.from_numpy(np.load(cache))
    log(f"rendering lesion targets for {len(specs)} training studies")
    t0 = time.perf_counter()
    out = []
    workers = max(1, min(cfg.render_workers, os.cpu_count() or 1))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        jobs = ((spec, vol.numpy(), model_cfg) for spec, vol in zip(specs, volumes, strict=True))
        for target in pool.imap(_lesion_worker, jobs, chunksize=8):
            out.append(target)
            if progress:
                progress(len(out), len(specs), {"phase": "lesions"})
    log(f"lesion targets in {time.perf_counter() - t0:.0f} s")
    array = np.stack(out)
    save_npy(cache, array)
    return torch.from_numpy(array)


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases or position tables)."""
    decay = [p for n, p in named if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "pos_embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def make_batch(volumes: list[torch.Tensor], texts: list, tokenizer: Any, model_cfg: MedVLMConfig, ids: SpecialIds,
               device: torch.device) -> tuple:
    """loss_on's arguments for studies' volumes and study_texts."""
    vols = torch.stack(volumes).float().unsqueeze(1).to(device)
    reports = sequence_batch([t[0] for t in texts], tokenizer, model_cfg, ids, device)
    qa_pairs = [(pair, owner) for owner, t in enumerate(texts) for pair in t[1]]
    qa_ids, qa_labels = sequence_batch([p for p, _ in qa_pairs], tokenizer, model_cfg, ids, device)
    qa_owner = torch.tensor([o for _, o in qa_pairs], dtype=torch.long, device=device)
    return vols, reports, (qa_ids, qa_labels, qa_owner), ids.image


def heldout_seeds(cfg: TrainConfig) -> range:
    return range(HELDOUT_SEED_START, HELDOUT_SEED_START + max(cfg.eval_studies, 1))


def finding_auc(scores: torch.Tensor, targets: torch.Tensor,
                labels: tuple[str, ...] | None = None) -> dict[str, float]:
    """ROC AUC per label (rank statistic; labels without both classes are left out). Columns are
    `finding_labels()` unless `labels` names them.

    Tied scores share their mean rank, so a tie counts half, as the area under the ROC curve does: bf16
    logits and integer filter scores tie often, and ranks broken by sort order made the same scores give
    different AUCs under numpy's and torch's sorts."""
    out = {}
    for j, label in enumerate(labels or finding_labels()):
        y = targets[:, j].bool()
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        if n_pos and n_neg:
            _, which, counts = scores[:, j].double().unique(return_inverse=True, return_counts=True)
            mean_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # ranks of a tie run, averaged
            rank = mean_rank[which]
            out[label] = round(float((rank[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)), 3)
    return out


def heldout_batch(cfg: TrainConfig, model_cfg: MedVLMConfig, tokenizer: Any, ids: SpecialIds,
                  device: torch.device) -> tuple:
    """A fixed batch of held-out studies (seeds training never draws) for the held-out loss."""
    rng = random.Random(cfg.seed)
    volumes, texts = [], []
    for seed in heldout_seeds(cfg):
        vol, spec = render_study(seed, model_cfg)
        volumes.append(torch.from_numpy(vol))
        texts.append(study_texts(spec, rng, cfg.qa_per_study))
    return make_batch(volumes, texts, tokenizer, model_cfg, ids, device)


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = True,
          log: Callable[[str], None] = print, progress: Callable[[int, int, dict], None] | None = None,
          evaluate: Callable[[MedVLM, Any, MedVLMConfig], dict] | None = None) -> Path:
    """Train and write `out_dir/model.safetensors`; resumable from `out_dir/last.pt`."""
    # A bad value fails here, before anything is written, not after minutes of rendering.
    autocast = autocast_context(cfg.autocast, torch.device(cfg.device))
    init_ckpt, init_record = None, {}
    if cfg.init:
        from edgevlm.checkpoint import load_checkpoint

        init_ckpt = load_checkpoint(cfg.init)
        if not init_ckpt.tokenizer_json:
            raise EdgeVLMError("--init needs a checkpoint that carries its tokenizer", cfg.init)
        init_record = {"init": {"source": Path(cfg.init).name, "sha256": init_ckpt.sha256}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    model_cfg = cfg.model_config() if init_ckpt is None else init_ckpt.config
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    tok_path = out_dir / "tokenizer.json"
    from edgevlm.models.tokenizer import load_tokenizer

    if resume and tok_path.exists():
        tokenizer = load_tokenizer(tok_path.read_text())
    elif init_ckpt is not None:
        tokenizer = load_tokenizer(init_ckpt.tokenizer_json)
        atomic_write(tok_path, lambda p: p.write_text(tokenizer.to_str()))
    else:
        log(f"training a {cfg.vocab_size}-token BPE tokenizer on {cfg.tokenizer_corpus_studies} synthetic studies")
        tokenizer = build_tokenizer(cfg, model_cfg)
        atomic_write(tok_path, lambda p: p.write_text(tokenizer.to_str()))
    model_cfg.decoder.vocab_size = tokenizer.get_vocab_size()
    ids = special_ids(tokenizer, model_cfg.prompt)
    if cfg.report_loss not in ("sentence", "token"):
        raise ValueError(f"report_loss must be 'sentence' or 'token', got {cfg.report_loss!r}")
    sentence_ends = sentence_end_table(tokenizer) if cfg.report_loss == "sentence" else None

    volumes, specs = render_training_set(cfg, model_cfg, out_dir, log, progress)
    lesions = (lesion_training_targets(cfg, model_cfg, out_dir, volumes, specs, log, progress)
               if cfg.lesion_weight > 0 else None)
    if init_ckpt is not None:
        # Trained weights: no zero-init, and no centering (already folded into its position table).
        model = init_ckpt.model.float()
        del init_ckpt
    else:
        model = MedVLM(model_cfg)
        prepare_for_training(model, mean_volume_of(volumes) if cfg.center_input else None)
    model.to(device)
    aux_head = FindingHead(model_cfg.num_visual_tokens, model_cfg.decoder.dim, len(finding_labels())).to(device)
    lesion_head = LesionHeads(model_cfg.vision.dim, model_cfg.decoder.dim, len(LESION_TYPES)).to(device)
    probe_head = DecoderProbe(model_cfg.decoder.dim, len(finding_labels())).to(device)
    optimizer = make_optimizer([*model.named_parameters(), *(("aux." + n, p) for n, p in aux_head.named_parameters())],
                               cfg.lr, cfg.weight_decay)

    # The lesion heads and the decoder probe get their own param groups, appended after the model's, so
    # runs started before a head existed resume (their optimizer state holds fewer groups).
    base_groups = len(optimizer.param_groups)
    head_groups = ([] if lesions is None
                   else [list(lesion_head.patch.parameters()), list(lesion_head.cell.parameters())])
    if cfg.decoder_probe_weight > 0:
        head_groups.append(list(probe_head.parameters()))

    def add_head_groups(upto: int) -> None:
        for params in head_groups[len(optimizer.param_groups) - base_groups : upto]:
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})

    start_step, history = 0, []
    last = out_dir / "last.pt"
    if resume and last.exists():
        state = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        if "aux_head" in state:
            aux_head.load_state_dict(state["aux_head"])
        if "lesion_head" in state:
            lesion_head.load_state_dict(state["lesion_head"])
        if "decoder_probe" in state:
            probe_head.load_state_dict(state["decoder_probe"])
        saved_groups = len(state["optimizer"]["param_groups"]) - base_groups
        if saved_groups > len(head_groups):
            raise ValueError(f"{last} was trained with more training-only heads than this run has: resume it "
                             "with the same --lesion-weight and --decoder-probe-weight")
        add_head_groups(saved_groups)
        optimizer.load_state_dict(state["optimizer"])
        start_step, history = int(state["step"]), json.loads(state["history"])
        log(f"resumed from {last} at step {start_step}")
    add_head_groups(len(head_groups))

    def save_state(done: int) -> None:
        state = {"model": model.state_dict(), "aux_head": aux_head.state_dict(),
                 "lesion_head": lesion_head.state_dict(), "decoder_probe": probe_head.state_dict(),
                 "optimizer": optimizer.state_dict(), "step": done,
                 "history": json.dumps(history)}
        atomic_write(last, lambda p: torch.save(state, p))

    heldout = heldout_batch(cfg, model_cfg, tokenizer, ids, device)
    from edgevlm.data import sample_study

    heldout_targets = torch.stack([finding_targets(sample_study(seed)) for seed in heldout_seeds(cfg)])
    heldout_lesions = None
    if lesions is not None:
        heldout_lesions = torch.from_numpy(np.stack([
            lesion_patch_targets(sample_study(seed), vol[0].cpu().numpy(), model_cfg)
            for seed, vol in zip(heldout_seeds(cfg), heldout[0], strict=True)]))
    order_rng = random.Random(cfg.seed * 7919 + start_step)
    text_rng = random.Random(cfg.seed * 104729 + start_step)
    train_findings = torch.stack([finding_targets(spec) for spec in specs])
    cached_tokens = None  # the frozen encoder's patch tokens, in the staged recipe's second stage

    def freeze_vision() -> torch.Tensor:
        # One optimizer serves both stages: AdamW skips parameters without a gradient (the decoder
        # in the first stage, the encoder in the second), so a resumed run needs nothing special.
        model.vision.requires_grad_(False)
        model.vision.eval()
        log(f"vision stage done: encoding {len(volumes)} training studies with the frozen encoder")
        return encode_patches(model, volumes, cfg.vision_batch_studies, autocast, device)

    model.train()
    t_step = time.perf_counter()
    for step in range(start_step, cfg.steps):
        vision_stage = step < cfg.vision_steps
        if (cfg.vision_steps > 0 or cfg.init) and not vision_stage and cached_tokens is None:
            cached_tokens = freeze_vision()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        if vision_stage:
            batch = order_rng.sample(range(len(specs)), cfg.vision_batch_studies)
            vols = torch.stack([volumes[i] for i in batch]).float().unsqueeze(1).to(device)
            with autocast:
                loss = vision_stage_loss(model, vols, aux_head, train_findings[batch].to(device),
                                         lesion_head if lesions is not None else None,
                                         None if lesions is None else lesions[batch].float().to(device))
        else:
            batch = order_rng.sample(range(len(specs)), cfg.batch_studies)
            texts = [study_texts(specs[i], text_rng, cfg.qa_per_study) for i in batch]
            swapped = counterfactual_rows(texts, specs, cfg.counterfactual_reports, text_rng)
            args = make_batch([volumes[i] for i in batch], texts, tokenizer, model_cfg, ids, device)
            with autocast:
                aux = None if cfg.aux_weight <= 0 else (aux_head, train_findings[batch].to(device), cfg.aux_weight)
                qa_shift = qa_position_shifts(text_rng, *args[2][0].shape, model_cfg.decoder.max_seq_len,
                                              cfg.qa_position_jitter)
                lesion_aux = None
                if lesions is not None:
                    lesion_aux = (lesion_head, lesions[batch].float().to(device), cfg.lesion_weight)
                probe = None
                if cfg.decoder_probe_weight > 0:
                    probe = (probe_head, train_findings[batch].to(device), cfg.decoder_probe_weight)
                weights = impression_weights([t[0][1] for t in texts], args[1][1], tokenizer, cfg.impression_weight,
                                             cfg.positive_impression_weight, swapped)
                loss = loss_on(model, *args, aux=aux, sentence_ends=sentence_ends, qa_shift=qa_shift,
                               lesion_aux=lesion_aux,
                               patch_tokens=None if cached_tokens is None else cached_tokens[batch].to(device).float(),
                               decoder_probe=probe, report_weights=weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        record = {"step": step + 1, "loss": round(loss.item(), 4), "lr": lr_at(step, cfg),
                  "s_per_step": round(time.perf_counter() - t_step, 3), **({"stage": "vision"} if vision_stage else {})}
        t_step = time.perf_counter()
        stage_end = cfg.vision_steps if vision_stage else cfg.steps
        tag = " (vision stage)" if vision_stage else ""
        if (step + 1) % cfg.eval_every == 0 or step + 1 == stage_end:
            model.eval()
            if vision_stage:
                with torch.no_grad(), autocast:
                    record.update(heldout_vision_metrics(model, heldout[0], aux_head, heldout_targets,
                                                         lesion_head, heldout_lesions))
                log(f"step {step + 1}{tag}: loss {record['loss']:.4f}, "
                    f"held-out {json.dumps({k: v for k, v in record.items() if k.startswith('heldout')})}")
            else:
                with torch.no_grad():
                    record["heldout_loss"] = round(loss_on(model, *heldout, sentence_ends=sentence_ends).item(), 4)
                    if cfg.aux_weight > 0:
                        record.update(heldout_vision_metrics(model, heldout[0], aux_head, heldout_targets,
                                                             lesion_head, heldout_lesions))
                    if cfg.decoder_probe_weight > 0:
                        record["heldout_decoder_probe_auc"] = decoder_probe_auc(model, heldout, probe_head,
                                                                                heldout_targets)
                if evaluate is not None:
                    record["eval"] = evaluate(model, tokenizer, model_cfg)
                log(f"step {step + 1}: loss {record['loss']:.4f}, held-out loss {record['heldout_loss']:.4f}"
                    + (f", finding-head AUC {json.dumps(record['heldout_finding_auc'])}"
                       if "heldout_finding_auc" in record else "")
                    + (f", lesion study AUC {json.dumps(record['heldout_lesion_study_auc'])}"
                       if "heldout_lesion_study_auc" in record else "")
                    + (f", decoder-probe AUC {json.dumps(record['heldout_decoder_probe_auc'])}"
                       if "heldout_decoder_probe_auc" in record else "")
                    + (f", eval {json.dumps(record['eval'])}" if "eval" in record else ""))
            model.train()
        history.append(record)
        if (step + 1) % cfg.log_every == 0:
            log(f"step {step + 1}/{cfg.steps}{tag}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                f"{record['s_per_step']:.2f} s/step")
        if progress:
            progress(step + 1, cfg.steps, record)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == stage_end:
            save_state(step + 1)

    model.eval()
    bake_parametrizations(model)
    extra = {
        "training": {"command": " ".join(shlex.quote(a) for a in sys.argv), "config": asdict(cfg),
                     "final_loss": history[-1]["loss"] if history else None,
                     "heldout_seed_start": HELDOUT_SEED_START},
        **init_record,
        **cfg.extra,
    }
    final = save_checkpoint(model, out_dir / "model.safetensors", tokenizer.to_str(), extra, dtype=torch.float16)
    atomic_write(out_dir / "history.json", lambda p: p.write_text(json.dumps(history, indent=1)))
    return final


def autocast_context(mode: str, device: torch.device) -> Any:
    """The autocast context of TrainConfig.autocast ("auto" | "bf16" | "fp32")."""
    if mode not in ("auto", "bf16", "fp32"):
        raise ValueError(f"autocast must be 'auto', 'bf16' or 'fp32', got {mode!r}")
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return _nullcontext()


def heldout_vision_metrics(model: MedVLM, volumes: torch.Tensor, finding_head: torch.nn.Module,
                           findings: torch.Tensor, lesion_heads: LesionHeads,
                           lesions: torch.Tensor | None) -> dict[str, dict[str, float]]:
    """Held-out AUCs of the training-only heads: per study (finding head; focal types from the most
    lesion-like visual token, what the decoder reads) and per patch."""
    tokens = model.vision.patch_tokens(volumes)
    visual = model.projector(tokens)
    out = {"heldout_finding_auc": finding_auc(finding_head(visual).float().cpu(), findings)}
    if lesions is not None:
        lesions = lesions.to(tokens.device)
        out["heldout_lesion_study_auc"] = finding_auc(lesion_heads.cell(visual).float().amax(1),
                                                      lesions.amax(1), LESION_TYPES)
        out["heldout_lesion_patch_auc"] = finding_auc(lesion_heads.patch(tokens).float().flatten(0, 1),
                                                      lesions.flatten(0, 1), LESION_TYPES)
    return out


def decoder_probe_auc(model: MedVLM, batch: tuple, probe: DecoderProbe, findings: torch.Tensor) -> dict[str, float]:
    """Held-out AUC of the decoder probe at each report's last prompt position, where the report starts:
    what the decoder knows about the image before it writes a word (`batch` is `make_batch`'s)."""
    volumes, (report_ids, report_labels), _, image_id = batch
    _, hidden = model.decoder(model.embed(report_ids, model.encode_image(volumes), image_id), return_hidden=True)
    start = (report_labels[:, 1:] != -100).float().argmax(1)  # the first position that predicts the report
    return finding_auc(probe(hidden[torch.arange(len(start)), start]).float().cpu(), findings)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
