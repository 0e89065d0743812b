"""Operating points of a structured report's decisions, chosen on calibration studies after training.

A model trained on edgevlm's reports opens every report with one line per finding type ("Lung mass: none."
or "Lung mass: 60 mm, right upper lobe."); the token after each "Type:" decides presence. Greedy decoding
compares " none" with each other token alone, so an answer whose first token is spread over many values
(sizes, sides, lobes) loses at P(none) well under one half. `PromptConfig.decisions` makes the decision on
P(none) itself (`edgevlm.models.medvlm.apply_decisions`); this module picks each type's threshold.

Per type, on studies no training, evaluation or quantization calibration draws (`DECISION_SEED_START`):
P(none) at the decision token, teacher-forced on the true report (its earlier impression lines given, as
greedy decoding has its own), from the native volume through the model's preprocessing. The threshold is
the one with the best F1 of presence among those whose false-positive rate stays within `max_fpr`, the
nearest to 1/2 among equals. The false-positive ceiling is what keeps a type the model barely sees (a
nodule at AUC 0.58) from being called in every study because prevalence alone makes that F1 look good.
The FINDINGS sections get the same kind of decision on their opening word (`SECTION_DECISIONS`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgevlm.data.findings import LATERAL_TYPES, SIDES
from edgevlm.errors import EdgeVLMError

NONE_TOKEN = " none"  # how an impression line states an absent finding (edgevlm.data.reports)
# The FINDINGS text has the same problem one level up: a section opens with its positive statements when it
# has any (edgevlm.data.reports), each in one of several phrasings ("There is airspace...", "Focal...",
# "Consolidation...", "Left..."), while the negatives of every absent type share one first word, " No".
# Held out, the teacher's impression called a consolidation and its findings opened with " No" at P = 0.28-0.36
# against ~0.65 for the positive openings together, then denied it. At 1/2, not calibrated: the section
# opens with " No" only when that is likelier than not.
SECTION_DECISIONS = {key: (" No", 0.5) for key in ("Lungs and airways:", "Pleura:", "Heart and mediastinum:")}
# Seeds for decision calibration: training draws 0.., held-out evaluation 1,000,000.., quantization
# calibration 2,000,000.. (edgevlm.calibration.CALIB_SEED_START).
DECISION_SEED_START = 3_000_000


def impression_slots() -> list[tuple[str, str]]:
    """(finding type, line key) of each structured-impression line, in report order: ("mass", "Lung mass:")."""
    from edgevlm.data.reports import _IMPRESSION_SLOTS

    return [(kind, f"{name}:") for kind, name in _IMPRESSION_SLOTS]


def decision_positions(text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, bool]]:
    """(index of the answer's first token, finding present) for each impression line of `text`, in
    report order; `offsets` are the tokenizer's character spans of `text`'s tokens."""
    from edgevlm.data.reports import impression_answers

    return [(next(k for k, (a, _) in enumerate(offsets) if a >= start), present)
            for start, _, present in impression_answers(text)]


@torch.no_grad()
def teacher_forced_reports(model: Any, tokenizer: Any, studies: Any) -> Any:
    """Per study: (report text as trained on, its tokens' character offsets, (T, vocab) probabilities where row j
    predicts report token j), teacher-forced on the true report from the native volume through the model's
    preprocessing (studies as `edgevlm.eval.runner.synthetic_studies` yields them)."""
    from edgevlm.models.tokenizer import encode_prompt, special_ids
    from edgevlm.preprocess import preprocess
    from edgevlm.train import REPORT_QUESTIONS, model_recipe

    cfg = model.cfg
    ids = special_ids(tokenizer, cfg.prompt)
    prompt = encode_prompt(tokenizer, cfg, REPORT_QUESTIONS[0])
    recipe = model_recipe(cfg)
    for study in studies:
        # The training target is " " + report (`edgevlm.train.sequence_batch`): offsets index into that text.
        text = " " + study.truth["report"]
        enc = tokenizer.encode(text, add_special_tokens=False)
        volume = preprocess(study.volume, recipe)
        x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
        logits = model.decoder(model.embed(torch.tensor([prompt + enc.ids]), model.encode_image(x), ids.image))[0]
        yield text, enc.offsets, logits[len(prompt) - 1:-1].float().softmax(-1)  # position t predicts token t + 1


def decision_probs(tokenizer: Any, forced: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P(none), truth, plain greedy says present), each (n_studies, n_types) in report order, from
    `teacher_forced_reports` (`forced`)."""
    none_ids = tokenizer.encode(NONE_TOKEN, add_special_tokens=False).ids
    if len(none_ids) != 1:
        raise EdgeVLMError(f"{NONE_TOKEN!r} is {len(none_ids)} tokens in this model's tokenizer; operating points "
                           "need one (a model trained on edgevlm's structured reports)")
    none_id = none_ids[0]
    p_none, truth, greedy = [], [], []
    for text, offsets, probs in forced:
        rows = decision_positions(text, offsets)
        p_none.append([float(probs[j, none_id]) for j, _ in rows])
        truth.append([present for _, present in rows])
        greedy.append([int(probs[j].argmax()) != none_id for j, _ in rows])
    return np.array(p_none), np.array(truth, dtype=bool), np.array(greedy, dtype=bool)


def side_probs(tokenizer: Any, forced: Any) -> dict[str, list[dict[str, Any]]]:
    """{line key: [{"truth": side, "left": P, "right": P, "bilateral": P}, ...]} at the side word of each
    present effusion and pneumothorax impression line ("Pleural effusion: small, right."), from
    `teacher_forced_reports` (`forced`): does the decoder read the side, given that the finding is there?"""
    from edgevlm.data.reports import impression_answers

    # A side's probability is its first token's: exact while the three first tokens differ.
    side_ids = {side: tokenizer.encode(" " + side, add_special_tokens=False).ids[0] for side in SIDES}
    if len(set(side_ids.values())) != len(SIDES):
        raise EdgeVLMError(f"the sides {SIDES} share a first token in this model's tokenizer; side_probs needs "
                           "them apart")
    out: dict[str, list[dict[str, Any]]] = {key: [] for kind, key in impression_slots() if kind in LATERAL_TYPES}
    for text, offsets, probs in forced:
        for (kind, key), (start, stop, present) in zip(impression_slots(), impression_answers(text), strict=True):
            if kind not in LATERAL_TYPES or not present:
                continue
            side = text[start:stop].split(",")[-1].strip()  # "small, right" or "right"
            at = text.rindex(side, start, stop)
            j = next(k for k, (_, end) in enumerate(offsets) if end > at)  # the token holding its first letter
            out[key].append({"truth": side, **{s: float(probs[j, i]) for s, i in side_ids.items()}})
    return out


def presence_scores(called: np.ndarray, present: np.ndarray) -> dict[str, float | None]:
    """Recall, false-positive rate and F1 of calling a finding (`called`) where it is `present`."""
    tp, fp = int((called & present).sum()), int((called & ~present).sum())
    fn = int((~called & present).sum())
    return {"recall": round(tp / (tp + fn), 3) if tp + fn else None,
            "fpr": round(fp / int((~present).sum()), 3) if (~present).any() else None,
            "f1": round(2 * tp / (2 * tp + fp + fn), 3) if tp + fp + fn else None}


def choose_threshold(p_none: np.ndarray, present: np.ndarray, max_fpr: float) -> float:
    """The threshold t (called present iff P(none) < t) with the best F1 among those whose false-positive
    rate is at most `max_fpr`, the nearest to 1/2 among equals; 0 (never called) when none is better."""
    negatives, positives = int((~present).sum()), int(present.sum())
    best, best_key = 0.0, (0.0, -0.5)
    for t in np.unique(np.r_[p_none, 0.5, 1.0]):
        called = p_none < t
        fp, tp = int((called & ~present).sum()), int((called & present).sum())
        if negatives and fp / negatives > max_fpr:
            continue
        f1 = 2 * tp / (positives + int(called.sum())) if positives else 0.0  # 2TP / (2TP + FP + FN)
        key = (round(f1, 9), -abs(float(t) - 0.5))
        if key > best_key:
            best, best_key = float(t), key
    return best


def calibrate_operating_points(model: Any, tokenizer: Any, n_studies: int = 400,
                               seed: int = DECISION_SEED_START, max_fpr: float = 0.05) -> dict[str, Any]:
    """{"decisions": {line key: (token, threshold)}, "per_type": {...}}: each impression type's threshold on
    `n_studies` calibration studies, and what plain greedy, P(none) < 1/2 and the threshold call there; the
    findings sections' `SECTION_DECISIONS` beside them."""
    from edgevlm.eval.runner import synthetic_studies
    from edgevlm.train import finding_auc

    if not 0.0 <= max_fpr <= 1.0:
        raise EdgeVLMError(f"max false-positive rate {max_fpr} is not in [0, 1]")
    t0 = time.perf_counter()
    p_none, truth, greedy = decision_probs(tokenizer, teacher_forced_reports(model, tokenizer,
                                                                              synthetic_studies(n_studies, seed)))
    slots = impression_slots()
    auc = finding_auc(torch.from_numpy(1.0 - p_none), torch.from_numpy(truth).float(),
                      tuple(kind for kind, _ in slots))
    thresholds, per_type = {}, {}
    for i, (kind, key) in enumerate(slots):
        t = choose_threshold(p_none[:, i], truth[:, i], max_fpr)
        thresholds[key] = (NONE_TOKEN, round(t, 4))
        per_type[kind] = {"n_positive": int(truth[:, i].sum()), "auc": auc.get(kind), "threshold": round(t, 4),
                          "greedy": presence_scores(greedy[:, i], truth[:, i]),
                          "p_none_below_half": presence_scores(p_none[:, i] < 0.5, truth[:, i]),
                          "at_threshold": presence_scores(p_none[:, i] < t, truth[:, i])}
    return {"decisions": {**thresholds, **SECTION_DECISIONS}, "per_type": per_type, "n_studies": n_studies,
            "first_seed": seed,
            "max_fpr": max_fpr, "method": "teacher-forced P(none) on the true report, native volume -> preprocess",
            "seconds": round(time.perf_counter() - t0, 1)}


def write_with_operating_points(source: Path, out: Path, n_studies: int, seed: int, max_fpr: float) -> dict:
    """Calibrate the checkpoint at `source` and write it to `out` (atomically) with its thresholds in the
    prompt config and the calibration record in its metadata; returns the record."""
    from safetensors import safe_open

    from edgevlm.checkpoint import load_checkpoint, save_checkpoint
    from edgevlm.models.tokenizer import load_tokenizer

    ckpt = load_checkpoint(source)
    if ckpt.kind != "edgevlm":
        raise EdgeVLMError("operating points are written into edgevlm .safetensors checkpoints; this is a "
                           f"{ckpt.kind} checkpoint", source)
    if ckpt.tokenizer_json is None:
        raise EdgeVLMError("checkpoint has no tokenizer; operating points need the one it was trained with", source)
    with safe_open(str(source), "pt") as f:  # written back in the dtype it was stored in (the demo's fp16)
        stored = {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (not a dict)
    model = ckpt.model.eval()
    record = calibrate_operating_points(model, load_tokenizer(ckpt.tokenizer_json), n_studies, seed, max_fpr)
    model.cfg.prompt.decisions = dict(record["decisions"])
    extra = {**(ckpt.extra or {}), "operating_points": record}
    save_checkpoint(model, out, ckpt.tokenizer_json, extra=extra,
                    dtype=torch.float16 if "F16" in stored and "F32" not in stored else None)
    return record
