"""Accuracy gates of a quantized bundle, measured at export against the fp32 graphs of the same export.

Two kinds of evidence, both written to the manifest (`accuracy`):
  parity  on calibration-disjoint held-out volumes: vision cosine (quantized vs fp32 visual tokens),
          decoder next-token KL(fp32 || quantized) and top-1 agreement, teacher-forced on the fp32 greedy
          tokens (so one early divergence does not hide or inflate every later step), and the first step
          where free-running greedy outputs part;
  task    `edgevlm.eval` metrics (finding micro F1, closed-question accuracy) of the quantized and the fp32
          graphs on the same held-out studies (seeds from GATE_SEED_START, the eval range).

The reference is the fp32 ONNX export, itself held to PyTorch fp32 by the parity gate (token-exact,
logits within 1e-3), so a difference here is the quantization's. The task gate needs a model that
does the task: when fp32's finding F1 is below `MIN_REFERENCE_F1` (a random-weight test model) the
retention ratio is meaningless and the task gate is recorded as not applicable; parity still gates.
The verdict also says whether the gate set can resolve its threshold (`one_finding_f1_change`): with
few true positives one flipped finding moves F1 by more than the tolerance, and a warning names a
gate-set size that would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgevlm.models import GenerationConfig

MIN_REFERENCE_F1 = 0.05


@dataclass(frozen=True)
class GateThresholds:
    vision_cosine_min: float  # per volume, quantized vs fp32 visual tokens
    kl_mean_max: float  # nats, mean over teacher-forced steps
    top1_agreement_min: float  # fraction of teacher-forced steps with the same argmax
    min_f1_retention: float | None  # quantized finding F1 >= this x fp32's (when fp32 F1 >= MIN_REFERENCE_F1)


def thresholds(precision: str) -> GateThresholds:
    from edgevlm.export.quantize import SCHEMES

    # int8 vision sits in every quantized word; the decoder part decides how loose the logits may be.
    loose = SCHEMES[precision].layers in ("int4", "auto")
    return GateThresholds(vision_cosine_min=0.98, kl_mean_max=0.05 if loose else 0.02,
                          top1_agreement_min=0.9 if loose else 0.95,
                          min_f1_retention=SCHEMES[precision].min_f1_retention)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(softmax(p) || softmax(q)) in nats, for one (vocab,) pair, in float64."""
    p = p_logits.astype(np.float64) - p_logits.max()
    q = q_logits.astype(np.float64) - q_logits.max()
    log_p = p - np.log(np.exp(p).sum())
    log_q = q - np.log(np.exp(q).sum())
    return float((np.exp(log_p) * (log_p - log_q)).sum())


def forced_logits(backend: Any, table: np.ndarray, volume: np.ndarray, prompt: list[int], tokens: list[int],
                  image_id: int, visual: np.ndarray | None = None) -> list[np.ndarray]:
    """Next-token logits (vocab,) after the prompt and after each of `tokens` (teacher forcing)."""
    from edgevlm.runtime.session import splice_embeddings

    visual = backend.encode(volume) if visual is None else visual
    t = len(prompt)
    total = t + len(tokens) + 1
    backend.reset_cache(1, total)
    slots = np.arange(total, dtype=np.int64)
    key_valid = np.ones((1, total), dtype=bool)
    ids = np.asarray([prompt], dtype=np.int64)
    out = [backend.step(splice_embeddings(table, ids, visual, image_id), slots[:t], slots[None, :t], key_valid)[0]]
    for i, tok in enumerate(tokens[:-1]):
        pos = slots[t + i:t + i + 1]
        out.append(backend.step(table[[tok]][:, None, :], pos, pos[None, :], key_valid)[0])
    return out


def measure_parity(quant: Any, ref: Any, table_q: np.ndarray, table_ref: np.ndarray, volumes: np.ndarray,
                   prompts: list[list[int]], image_id: int, max_new_tokens: int) -> dict[str, Any]:
    """Vision cosine, teacher-forced KL / top-1 agreement and greedy divergence of `quant` vs `ref`."""
    from edgevlm.runtime.session import generate_ids

    gen = GenerationConfig(max_new_tokens=max_new_tokens)  # no stop tokens: every step compared
    cosines, kls, agree, diverged = [], [], [], []
    for i in range(len(volumes)):
        vol = volumes[i:i + 1]
        vis_q, vis_r = quant.encode(vol).astype(np.float32), ref.encode(vol).astype(np.float32)
        cosines.append(cosine(vis_q, vis_r))
        prompt = prompts[i % len(prompts)]
        ref_tokens = generate_ids(ref, table_ref, vol, [prompt], image_id, gen)[0]
        lr = forced_logits(ref, table_ref, vol, prompt, ref_tokens, image_id, vis_r)
        lq = forced_logits(quant, table_q, vol, prompt, ref_tokens, image_id, vis_q)
        kls += [kl_divergence(a, b) for a, b in zip(lr, lq, strict=True)]
        agree += [int(a.argmax() == b.argmax()) for a, b in zip(lr, lq, strict=True)]
        q_tokens = generate_ids(quant, table_q, vol, [prompt], image_id, gen)[0]
        diverged.append(next((s for s, (a, b) in enumerate(zip(q_tokens, ref_tokens, strict=True)) if a != b), None))
    return {
        "n_volumes": len(volumes),
        "steps_per_volume": max_new_tokens,
        "vision_cosine": cosines,
        "vision_cosine_min": min(cosines),
        "logit_kl_mean": float(np.mean(kls)),
        "logit_kl_max": float(np.max(kls)),
        "top1_agreement": float(np.mean(agree)),
        "greedy_first_divergence": diverged,
        "greedy_equal_runs": sum(d is None for d in diverged),
    }


def backend_predictor(backend: Any, table: np.ndarray, cfg: Any, tokenizer: Any,
                      max_new_tokens: int | None) -> Callable[[np.ndarray, list[str]], list[str]]:
    """(preprocessed (D, H, W), questions) -> answers, on a runtime backend (as eval's bundle_predictor)."""
    from edgevlm.models.tokenizer import decode, encode_prompt, generation_config, special_ids
    from edgevlm.runtime.session import generate_ids

    ids = special_ids(tokenizer, cfg.prompt)
    gen = generation_config(tokenizer, cfg, max_new_tokens)

    def predict(volume: np.ndarray, questions: list[str]) -> list[str]:
        prompts = [encode_prompt(tokenizer, cfg, q) for q in questions]
        batch = np.repeat(volume[None, None].astype(np.float32), len(prompts), axis=0)
        rows = generate_ids(backend, table, batch, prompts, ids.image, gen)
        return [decode(tokenizer, row, ids.stop) for row in rows]

    return predict


def task_metrics(predict: Callable[[np.ndarray, list[str]], list[str]], studies: Any, report_question: str,
                 on_study: Callable[[], None] | None = None) -> dict[str, Any]:
    """Finding F1 and closed-question accuracy over a CalibrationSet built `with_truth` (preprocessed)."""
    from edgevlm.eval import evaluate_predictions

    records = []
    for i, truth in enumerate(studies.truths):
        qas = truth.get("questions", [])
        answers = predict(studies.volumes[i, 0], [report_question] + [qa["question"] for qa in qas])
        records.append({"study_id": f"gate-{i}", "predicted_report": answers[0], "reference_report": truth["report"],
                        "reference_findings": truth["findings"],
                        "qa": [{**qa, "prediction": a} for qa, a in zip(qas, answers[1:], strict=True)]})
        if on_study:
            on_study()
    m = evaluate_predictions(records)
    micro = m["findings"]["micro"]
    return {"finding_f1": float(micro["f1"]), "closed_accuracy": m["closed"]["accuracy"],
            "n_studies": m["n_studies"], "n_closed": m["closed"]["n"],
            "tp": micro["tp"], "fp": micro["fp"], "fn": micro["fn"]}


def one_finding_f1_change(tp: int, fp: int, fn: int) -> float:
    """Relative F1 drop when one true positive becomes a false negative: the smallest change in finding F1
    a gate set with these counts can show. When it exceeds a gate's tolerance (2% for int4), a single
    flipped finding decides pass or fail, so the set is too small to resolve the threshold."""
    from edgevlm.eval.clinical import _prf

    if tp <= 0:
        return 1.0
    return 1.0 - _prf(tp - 1, fp, fn + 1)["f1"] / _prf(tp, fp, fn)["f1"]


def judge(parity: dict[str, Any], task_q: dict[str, Any] | None, task_ref: dict[str, Any] | None,
          limit: GateThresholds) -> dict[str, Any]:
    """The manifest's gate verdict: failures named with their numbers."""
    failures: list[str] = []
    warnings: list[str] = []
    if parity["vision_cosine_min"] < limit.vision_cosine_min:
        failures.append(f"vision cosine {parity['vision_cosine_min']:.4f} < {limit.vision_cosine_min}")
    if parity["logit_kl_mean"] > limit.kl_mean_max:
        failures.append(f"logit KL {parity['logit_kl_mean']:.4f} > {limit.kl_mean_max}")
    if parity["top1_agreement"] < limit.top1_agreement_min:
        failures.append(f"top-1 agreement {parity['top1_agreement']:.3f} < {limit.top1_agreement_min}")
    task: dict[str, Any] = {"applicable": False}
    if task_q is not None and task_ref is not None and limit.min_f1_retention is not None:
        ref_f1 = task_ref["finding_f1"]
        if ref_f1 >= MIN_REFERENCE_F1:
            retention = task_q["finding_f1"] / ref_f1
            closed = (task_q["closed_accuracy"] / task_ref["closed_accuracy"]
                      if task_ref.get("closed_accuracy") else None)
            task = {"applicable": True, "f1_retention": retention, "closed_accuracy_retention": closed}
            step = one_finding_f1_change(task_ref["tp"], task_ref["fp"], task_ref["fn"])
            tolerance = 1.0 - limit.min_f1_retention
            task["one_finding_f1_change"] = step
            task["resolves_threshold"] = step <= tolerance
            if step > tolerance:
                n = task_ref["n_studies"]
                # F1's step shrinks about as 1/tp, and tp grows with the studies.
                suggested = int(np.ceil(n * step / tolerance / 10.0)) * 10
                warnings.append(f"gate set too small to resolve {limit.min_f1_retention:.0%} F1 retention: one "
                                f"finding moves fp32's F1 by {step:.1%} ({task_ref['tp']} true positives in "
                                f"{n} studies); use about {suggested} gate studies")
            if retention < limit.min_f1_retention:
                failures.append(f"finding F1 {task_q['finding_f1']:.4f} = {retention:.1%} of fp32's {ref_f1:.4f} "
                                f"< {limit.min_f1_retention:.0%}")
        else:
            task["reason"] = f"fp32 finding F1 {ref_f1:.3f} < {MIN_REFERENCE_F1}: the model does not do the task"
    return {"thresholds": asdict(limit), "parity": parity, "task": {**task, "quantized": task_q, "fp32": task_ref},
            "passed": not failures, "failures": failures, "warnings": warnings}
