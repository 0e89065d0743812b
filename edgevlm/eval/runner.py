"""Running a model over held-out studies and scoring it: what `edgevlm eval` does.

A study source yields (study_id, Volume, ground truth); a predictor answers a list of questions about
one preprocessed volume. Checkpoints predict through the PyTorch model; bundles (once exported) through
`edgevlm.runtime`. Held-out synthetic studies come from seeds training never draws
(`edgevlm.train.HELDOUT_SEED_START` on) and are rendered at their native DICOM geometry, then pass the
model's own preprocessing recipe, exactly as a loaded series would.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgevlm.errors import EdgeVLMError
from edgevlm.volume import Volume

# (preprocessed volume (D, H, W), questions) -> answers, one per question
Predictor = Callable[[np.ndarray, list[str]], list[str]]


@dataclass
class Study:
    study_id: str
    volume: Volume
    truth: dict[str, Any]  # ground_truth.json: findings, report, questions


def synthetic_studies(n: int, seed: int | None = None) -> Iterator[Study]:
    """n held-out synthetic studies, rendered at their native series geometry (not the model grid)."""
    from edgevlm.data import render_volume, sample_study
    from edgevlm.data.reports import ground_truth
    from edgevlm.train import HELDOUT_SEED_START

    start = HELDOUT_SEED_START if seed is None else seed
    if start < HELDOUT_SEED_START:
        raise EdgeVLMError(f"held-out seeds start at {HELDOUT_SEED_START}; seed {start} is in the training range")
    for s in range(start, start + n):
        spec = sample_study(s)
        hu = render_volume(spec, spec.native_shape_zyx, spec.native_spacing_mm)
        yield Study(spec.study_id, Volume(hu, spec.native_spacing_mm, spec.native_origin_mm()), ground_truth(spec))


def folder_studies(folder: str | Path) -> Iterator[Study]:
    """Studies written by `edgevlm studies make-synthetic`: <id>/dicom/ + <id>/ground_truth.json."""
    from edgevlm.io import load_study

    folder = Path(folder)
    truths = sorted(folder.glob("*/ground_truth.json"))
    if not truths:
        raise EdgeVLMError(
            "no */ground_truth.json found: eval needs studies with ground truth "
            "(make them with `edgevlm studies make-synthetic`)",
            folder,
        )
    for gt in truths:
        truth = json.loads(gt.read_text())
        yield Study(truth.get("study_id", gt.parent.name), load_study(gt.parent / "dicom"), truth)


def parse_studies(source: str, seed: int | None = None) -> tuple[Iterator[Study], int]:
    """`synthetic:N` or a folder -> (studies, count)."""
    from edgevlm.data.source import parse_source

    parsed = parse_source(source, "--studies")
    if isinstance(parsed, int):
        return synthetic_studies(parsed, seed), parsed
    return folder_studies(parsed), len(list(parsed.glob("*/ground_truth.json")))


def checkpoint_predictor(path: str | Path, max_new_tokens: int | None = None) -> tuple[Predictor, Any]:
    """A predictor over a checkpoint in PyTorch, and its recipe (for preprocessing)."""
    from edgevlm.checkpoint import load_checkpoint
    from edgevlm.train import model_recipe

    ckpt = load_checkpoint(path)
    if ckpt.tokenizer_json is None:
        raise EdgeVLMError("checkpoint carries no tokenizer; eval needs one", path)
    return model_predictor(ckpt.model, ckpt.tokenizer_json, max_new_tokens), model_recipe(ckpt.config)


def bundle_predictor(path: str | Path, max_new_tokens: int | None = None, backend: str = "ort",
                     threads: int | None = None) -> tuple[Predictor, Any]:
    """A predictor over an exported bundle (edgevlm.runtime), and the bundle's recipe."""
    from edgevlm.models.tokenizer import decode, encode_prompt, special_ids
    from edgevlm.runtime import generate_ids, load_bundle

    session = load_bundle(path, backend=backend, threads=threads)
    gen = session.generation_config(max_new_tokens)
    image_id = special_ids(session.tokenizer, session.config.prompt).image

    def predict(volume: np.ndarray, questions: list[str]) -> list[str]:
        array = session.preprocess(volume)  # (1, 1, D, H, W)
        prompts = [encode_prompt(session.tokenizer, session.config, q) for q in questions]
        # One row per question, all on this study: a batched, left-padded generation.
        rows = generate_ids(session.backend, session.table, np.repeat(array, len(prompts), axis=0), prompts,
                            image_id, gen)
        return [decode(session.tokenizer, row, gen.stop_ids) for row in rows]

    return predict, session.recipe


def model_predictor(model: Any, tokenizer: Any, max_new_tokens: int | None = None) -> Predictor:
    from edgevlm.models.tokenizer import decode, encode_prompt, generation_config, load_tokenizer, special_ids

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    cfg = model.cfg
    try:
        ids = special_ids(tok, cfg.prompt)
        gen = generation_config(tok, cfg, max_new_tokens)
    except ValueError as e:
        raise EdgeVLMError(f"tokenizer does not fit the model's prompt config: {e}") from None

    def predict(volume: np.ndarray, questions: list[str]) -> list[str]:
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
            x = x.to(next(model.parameters()).device)  # a model on CUDA (e.g. evaluated while training)
            visual = model.encode_image(x)
            prompts = [encode_prompt(tok, cfg, q) for q in questions]
            out = model.generate(None, prompts, ids.image, gen, visual=visual.expand(len(prompts), -1, -1))
        return [decode(tok, row, ids.stop) for row in out]

    return predict


def run_eval(
    predict: Predictor,
    recipe: Any,
    studies: Iterator[Study],
    report_question: str,
    on_study: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Predict a report and every question's answer per study, then score everything."""
    from edgevlm.eval import evaluate_predictions
    from edgevlm.preprocess import preprocess

    records = []
    for i, study in enumerate(studies):
        volume = preprocess(study.volume, recipe)
        qas = study.truth.get("questions", [])
        answers = predict(volume, [report_question] + [qa["question"] for qa in qas])
        records.append({
            "study_id": study.study_id,
            "predicted_report": answers[0],
            "reference_report": study.truth["report"],
            "reference_findings": study.truth["findings"],
            "qa": [{**qa, "prediction": a} for qa, a in zip(qas, answers[1:], strict=True)],
        })
        if on_study:
            on_study(i + 1)
    return evaluate_predictions(records)
