"""Parity of an exported bundle against the PyTorch fp32 model, measured at export time.

Three checks, on synthetic chest CT studies from `edgevlm.data` (seeded random volumes if that package
is not importable) preprocessed with the bundle's own recipe:
  vision   per-volume cosine similarity of the projected visual tokens (ort vs torch fp32);
  logits   max |ort - torch| of the decoder's next-token logits at every generated step;
  greedy   the generated token ids, token for token, one prompt per volume plus one batched,
           left-padded call (dynamic batch and padding exercised through the exported graphs).

Thresholds (THRESHOLDS): fp32 bundles must match exactly in tokens, cosine >= 0.9999 and logits within
1e-3. fp16 bundles: cosine >= 0.999, logits within 1e-2 x max(1, max|logit|) (fp16 keeps ~3 decimal
digits), and greedy tokens may part only at a near-tie: where the fp32 reference's top-2 logit margin
is within that same tolerance (after which the histories differ and nothing more is compared).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgevlm.models import GenerationConfig, MedVLMConfig
from edgevlm.runtime.session import generate_ids

PARITY_QUESTIONS = (
    "Write the radiology report for this CT.",
    "Is there a pleural effusion?",
    "Describe the lungs and the mediastinum.",
    "Where is the largest nodule?",
)


@dataclass(frozen=True)
class ParityThresholds:
    vision_cosine_min: float
    logits_max_abs_diff: float  # absolute for fp32; times max(1, max|logit|) when relative_logits
    relative_logits: bool
    exact_tokens: bool


THRESHOLDS = {
    "fp32": ParityThresholds(vision_cosine_min=0.9999, logits_max_abs_diff=1e-3, relative_logits=False,
                             exact_tokens=True),
    "fp16": ParityThresholds(vision_cosine_min=0.999, logits_max_abs_diff=1e-2, relative_logits=True,
                             exact_tokens=False),
}


@dataclass
class ParityConfig:
    n_volumes: int = 3
    max_new_tokens: int = 8
    seed: int = 0


def parity_volumes(cfg: MedVLMConfig, recipe: Any, n: int, seed: int) -> tuple[np.ndarray, str]:
    """(n, 1, D, H, W) preprocessed volumes and a sentence saying where they came from."""
    try:
        from edgevlm.data import render_volume, sample_study
        from edgevlm.preprocess import preprocess
        from edgevlm.volume import Volume
    except ImportError as e:  # the synthetic-data package is optional here; say so in the manifest
        rng = np.random.default_rng(seed)
        shape = (n, 1, *cfg.vision.image_size)
        return rng.random(shape, dtype=np.float32), f"seeded random uniform [0, 1) volumes, seed {seed} ({e})"
    arrays = []
    for i in range(n):
        spec = sample_study(seed + i)
        # A coarse rendering of the whole study extent: the recipe resamples it to the model's grid anyway.
        extent = [s * p for s, p in zip(spec.native_shape_zyx, spec.native_spacing_mm, strict=True)]
        shape = tuple(max(8, min(int(n_vox), g)) for n_vox, g in
                      zip(spec.native_shape_zyx, cfg.vision.image_size, strict=True))
        spacing = tuple(e / s for e, s in zip(extent, shape, strict=True))
        hu = render_volume(spec, shape, spacing)
        arrays.append(preprocess(Volume(hu, spacing), recipe))
    return np.stack(arrays)[:, None], (f"edgevlm.data synthetic chest CT studies, seeds {seed}..{seed + n - 1}, "
                                       f"preprocessed with the bundle recipe '{recipe.name}'")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def compare_generation(ort_tokens: list[int], ref_tokens: list[int], ort_logits: list[np.ndarray],
                       ref_logits: list[np.ndarray], limit: ParityThresholds) -> dict[str, Any]:
    """Token agreement and logits difference over the steps whose histories are identical."""
    compared, max_diff, diverged_at, near_tie = 0, 0.0, None, False
    scale = 1.0
    for step, (lo, lr) in enumerate(zip(ort_logits, ref_logits, strict=False)):
        scale = max(scale, float(np.abs(lr).max())) if limit.relative_logits else 1.0
        max_diff = max(max_diff, float(np.abs(lo.astype(np.float64) - lr).max()))
        compared += 1
        if step >= len(ort_tokens) or step >= len(ref_tokens) or ort_tokens[step] != ref_tokens[step]:
            top2 = np.sort(lr.astype(np.float64).ravel())[-2:]
            near_tie = bool(top2[1] - top2[0] <= limit.logits_max_abs_diff * scale)
            diverged_at = step
            break
    tokens_ok = ort_tokens == ref_tokens or (not limit.exact_tokens and diverged_at is not None and near_tie)
    return {"tokens_equal": ort_tokens == ref_tokens, "tokens_ok": tokens_ok, "diverged_at_step": diverged_at,
            "steps_compared": compared, "logits_max_abs_diff": max_diff, "logits_scale": scale,
            "logits_ok": max_diff <= limit.logits_max_abs_diff * scale}


def measure_parity(ort_backend: Any, ref_backend: Any, table_ort: np.ndarray, table_ref: np.ndarray,
                   cfg: MedVLMConfig, tokenizer: Any, recipe: Any, precision: str,
                   options: ParityConfig) -> dict[str, Any]:
    """Run every check; returns the manifest's `parity` section (with `passed` and `failures`)."""
    from edgevlm.models.tokenizer import encode_prompt, special_ids

    limit = THRESHOLDS[precision]
    volumes, source = parity_volumes(cfg, recipe, options.n_volumes, options.seed)
    vis_ort, vis_ref = ort_backend.encode(volumes).astype(np.float32), ref_backend.encode(volumes)
    cosines = [cosine(vis_ort[i], vis_ref[i]) for i in range(len(volumes))]
    ids = special_ids(tokenizer, cfg.prompt)
    # Stop tokens off: every run makes all max_new_tokens steps, so every step is compared.
    gen = GenerationConfig(max_new_tokens=options.max_new_tokens, pad_id=ids.pad)
    runs = []
    prompts = [encode_prompt(tokenizer, cfg, PARITY_QUESTIONS[i % len(PARITY_QUESTIONS)]) for i in range(len(volumes))]
    for i, prompt in enumerate(prompts):
        lo: list[np.ndarray] = []
        lr: list[np.ndarray] = []
        tok_o = generate_ids(ort_backend, table_ort, volumes[i:i + 1], [prompt], ids.image, gen, logits_out=lo)[0]
        tok_r = generate_ids(ref_backend, table_ref, volumes[i:i + 1], [prompt], ids.image, gen, logits_out=lr)[0]
        runs.append({"volume": i, "question": PARITY_QUESTIONS[i % len(PARITY_QUESTIONS)], "ort_tokens": tok_o,
                     "torch_tokens": tok_r, **compare_generation(tok_o, tok_r, lo, lr, limit)})
    if len(volumes) >= 2:  # one batched, left-padded call: prompts of different lengths
        pair = [prompts[0], prompts[1]]
        tok_o = generate_ids(ort_backend, table_ort, volumes[:2], pair, ids.image, gen)
        tok_r = generate_ids(ref_backend, table_ref, volumes[:2], pair, ids.image, gen)
        runs.append({"volume": "batch of 2, left-padded", "ort_tokens": tok_o, "torch_tokens": tok_r,
                     # fp16: the single-prompt runs above carry the near-tie analysis
                     "tokens_equal": tok_o == tok_r, "tokens_ok": tok_o == tok_r or not limit.exact_tokens})
    failures = []
    if min(cosines) < limit.vision_cosine_min:
        failures.append(f"vision cosine {min(cosines):.6f} < {limit.vision_cosine_min}")
    worst = max(r.get("logits_max_abs_diff", 0.0) for r in runs)
    if not all(r.get("logits_ok", True) for r in runs):
        failures.append(f"decoder logits max abs diff {worst:.3g} > {limit.logits_max_abs_diff:g}"
                        f"{' x scale' if limit.relative_logits else ''}")
    bad_tokens = [str(r["volume"]) for r in runs if not r["tokens_ok"]]
    if bad_tokens:
        failures.append(f"greedy tokens differ from PyTorch fp32 (runs: {', '.join(bad_tokens)})")
    return {
        "reference": "PyTorch fp32 eager (the source checkpoint)",
        "inputs": source,
        "precision": precision,
        "thresholds": asdict(limit),
        "vision_cosine": cosines,
        "vision_cosine_min": min(cosines),
        "vision_max_abs_diff": float(np.abs(vis_ort - vis_ref).max()),
        "logits_max_abs_diff": worst,
        "max_new_tokens": options.max_new_tokens,
        "generation": runs,
        "passed": not failures,
        "failures": failures,
    }
