"""One benchmark configuration (a bundle on a backend), measured in a process of its own.

    python -m edgevlm.bench.worker SPEC.json      # JSON event lines on stdout, prefixed EVENT_PREFIX

A fresh process per configuration gives each one a clean peak RSS (no allocator memory left over
from the previous bundle) and lets the parent keep what finished when a configuration fails. The
scenarios follow MLPerf Inference (DESIGN.md decision 9):

  single_stream  one study at a time, end to end (read the study from disk -> text); `warmup` runs
                 first (excluded, counted), then `repeats` passes over the set in a seeded order.
  offline        all studies available at once; batched generation at each batch size (one warm-up
                 batch excluded per size); throughput in studies per hour, best size reported.
  accuracy       a report plus every ground-truth question per study, scored as `edgevlm eval` does
                 (batched per study, like eval); token ids kept for agreement with the reference.

Ctrl-C: the worker stops at its next progress event (after the measurement under way) and still emits what
it measured (complete: false).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgevlm.bench.memory import MemoryTimeline
from edgevlm.bench.stats import summarize

EVENT_PREFIX = "@edgevlm-bench "
STAGES = ("read", "preprocess", "vision", "prefill", "decode")
Emit = Callable[[dict[str, Any]], None]


def _load(path: str) -> Any:
    from edgevlm.io import load_study

    return load_study(path)


def single_stream(session: Any, studies: list[dict], spec: dict, result: dict, emit: Emit) -> None:
    """Per-study end-to-end latency; samples are appended to result as they are measured."""
    max_new = spec.get("max_new_tokens")
    out = result["single_stream"] = {"warmup_runs": 0, "repeats": spec["repeats"], "samples": []}
    for i in range(spec["warmup"]):  # warm-up: first-call allocations, caches, thread pools; not timed
        session.generate(_load(studies[i % len(studies)]["path"]), None, max_new)
        out["warmup_runs"] += 1
    total = spec["repeats"] * len(studies)
    for repeat in range(spec["repeats"]):
        order = np.random.default_rng(spec["seed"] + repeat).permutation(len(studies))  # MLPerf: seeded order
        for j in order:
            study = studies[int(j)]
            start = time.perf_counter()
            volume = _load(study["path"])
            read_ms = (time.perf_counter() - start) * 1000
            r = session.generate(volume, None, max_new)
            latency_ms = (time.perf_counter() - start) * 1000
            t = r.timings_ms
            out["samples"].append({
                "repeat": repeat, "study_key": study["key"], "latency_ms": latency_ms,
                "ttft_ms": read_ms + t["preprocess"] + t["vision"] + t["prefill"],
                "read_ms": read_ms, **{f"{s}_ms": t[s] for s in STAGES[1:]},
                "n_new_tokens": r.n_new_tokens, "decode_ms_per_token": r.decode_ms_per_token,
            })
            emit({"event": "progress", "phase": "single stream", "done": len(out["samples"]), "total": total})


def offline(session: Any, studies: list[dict], spec: dict, result: dict, emit: Emit) -> None:
    """Batched throughput over the whole set at each batch size (reading included, as in single stream)."""
    from edgevlm.models.tokenizer import encode_prompt, special_ids
    from edgevlm.runtime import generate_ids

    gen = session.generation_config(spec.get("max_new_tokens"))
    prompt = encode_prompt(session.tokenizer, session.config, session.config.prompt.default_question)
    image_id = special_ids(session.tokenizer, session.config.prompt).image
    sizes = sorted({b for b in spec["batch_sizes"] if b <= len(studies)} or {1})
    out = result["offline"] = {"tried": []}
    passes = max(1, spec["repeats"])

    def run(chunk: list[dict]) -> int:
        volume = np.concatenate([session.preprocess(_load(s["path"])) for s in chunk])
        rows = generate_ids(session.backend, session.table, volume, [prompt] * len(chunk), image_id, gen)
        return sum(len(r) for r in rows)

    done = 0
    for b in sizes:
        run(studies[:b])  # warm-up at this batch size: the KV cache is reallocated for a new shape
        entry = {"batch_size": b, "warmup_batches": 1, "studies_per_hour": [], "tokens_per_s": []}
        out["tried"].append(entry)
        for _ in range(passes):
            start = time.perf_counter()
            tokens = sum(run(studies[k:k + b]) for k in range(0, len(studies), b))
            seconds = time.perf_counter() - start
            entry["studies_per_hour"].append(len(studies) / seconds * 3600)
            entry["tokens_per_s"].append(tokens / seconds)
            done += 1
            emit({"event": "progress", "phase": f"offline b={b}", "done": done, "total": passes * len(sizes)})


def accuracy(session: Any, studies: list[dict], spec: dict, result: dict, emit: Emit) -> None:
    """Report + questions per study; records for evaluate_predictions, token ids for agreement."""
    from edgevlm.models.tokenizer import decode, encode_prompt, special_ids
    from edgevlm.runtime import generate_ids

    gen = session.generation_config(spec.get("max_new_tokens"))
    image_id = special_ids(session.tokenizer, session.config.prompt).image
    result["_records"], result["outputs"] = [], []
    for i, study in enumerate(studies):
        truth = json.loads(Path(study["truth_path"]).read_text()) if study.get("truth_path") else None
        qas = truth.get("questions", []) if truth else []
        questions = [session.config.prompt.default_question] + [qa["question"] for qa in qas]
        array = session.preprocess(_load(study["path"]))
        prompts = [encode_prompt(session.tokenizer, session.config, q) for q in questions]
        rows = generate_ids(session.backend, session.table, np.repeat(array, len(prompts), axis=0), prompts,
                            image_id, gen)
        texts = [decode(session.tokenizer, row, gen.stop_ids) for row in rows]
        result["outputs"].append({"key": study["key"], "token_ids": rows, "texts": texts})
        if truth is not None:
            result["_records"].append({
                "study_id": study["key"], "predicted_report": texts[0], "reference_report": truth["report"],
                "reference_findings": truth["findings"],
                "qa": [{**qa, "prediction": a} for qa, a in zip(qas, texts[1:], strict=True)]})
        emit({"event": "progress", "phase": "accuracy", "done": i + 1, "total": len(studies)})


def headline_metrics(metrics: dict) -> dict[str, Any]:
    """The accuracy numbers a report shows, from `evaluate_predictions` output."""
    f, lex = metrics["findings"], metrics["lexical"]
    return {
        "n_studies": metrics["n_studies"],
        "finding_micro_f1": f["micro"]["f1"], "finding_micro_precision": f["micro"]["precision"],
        "finding_micro_recall": f["micro"]["recall"], "finding_macro_f1": f["macro_types"]["f1"],
        "closed_accuracy": metrics["closed"]["accuracy"], "n_closed": metrics["closed"]["n"],
        "open_accuracy": metrics["open"]["accuracy"], "n_open": metrics["open"]["n"],
        **{k: lex.get(k) for k in ("bleu1", "bleu4", "rouge_l", "meteor_nosyn")},
    }


def finalize(result: dict) -> dict:
    """Summaries from the raw measurements (also for a run cut short)."""
    ss = result.get("single_stream")
    if ss is not None:
        samples = ss["samples"]
        ss["n_samples"] = len(samples)
        for name in ("latency_ms", "ttft_ms", "decode_ms_per_token", "n_new_tokens"):
            ss[name] = summarize([s[name] for s in samples if s[name] is not None])
        ss["stages_ms_mean"] = {s: float(np.mean([x[f"{s}_ms"] for x in samples])) if samples else None
                                for s in STAGES}
        ss["per_repeat"] = [{"repeat": r, **{k: summarize([s["latency_ms"] for s in samples if s["repeat"] == r])[k]
                                            for k in ("n", "p50", "p90")}}
                            for r in sorted({s["repeat"] for s in samples})]
    off = result.get("offline")
    if off is not None:
        for entry in off["tried"]:
            entry["studies_per_hour_median"] = float(np.median(entry["studies_per_hour"])) \
                if entry["studies_per_hour"] else None
        measured = [e for e in off["tried"] if e["studies_per_hour_median"] is not None]
        best = max(measured, key=lambda e: e["studies_per_hour_median"], default=None)
        off["best_batch_size"] = best["batch_size"] if best else None
        off["studies_per_hour"] = best["studies_per_hour_median"] if best else None
    records = result.pop("_records", None)
    if records:
        from edgevlm.eval import evaluate_predictions

        result["accuracy"] = headline_metrics(evaluate_predictions(records))
    return result


def _threads(session: Any) -> dict[str, Any]:
    backend = session.backend
    if backend.name == "ort":
        opts = backend.decoder.get_session_options()
        return {"ort_intra_op": opts.intra_op_num_threads, "ort_inter_op": opts.inter_op_num_threads,
                "note": "0 = onnxruntime default (one per physical core)"}
    import torch

    return {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads()}


def run_config(spec: dict, emit: Emit, result: dict) -> dict:
    """Load the bundle and run the scenarios in spec["scenarios"]; fills `result` as it goes."""
    from edgevlm.runtime import load_bundle

    memory = MemoryTimeline().start()
    result["memory"] = None
    try:
        memory.mark("load")
        emit({"event": "progress", "phase": "load", "done": 0, "total": 1})
        session = load_bundle(spec["bundle"], backend=spec["backend"], threads=spec.get("threads"))
        emit({"event": "progress", "phase": "load", "done": 1, "total": 1})  # also where a Ctrl-C during load stops
        result["bundle_load_ms"] = session.load_ms
        result["providers"] = session.providers
        result["device"] = getattr(session.backend, "device", "cpu")
        result["threads"] = _threads(session)
        phases = {"single_stream": single_stream, "offline": offline, "accuracy": accuracy}
        for name in spec["scenarios"]:
            memory.mark(name.replace("_", " "))
            phases[name](session, spec["studies"], spec, result, emit)
    finally:
        result["memory"] = memory.stop()
    result["complete"] = True
    return result


def main(argv: list[str] | None = None) -> int:
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    stop_requested = False

    def on_sigint(signum: int, frame: Any) -> None:
        # Ctrl-C is acted on between measurements (the progress events below), not where it lands: raised
        # asynchronously, a KeyboardInterrupt would cut into onnxruntime, torch or pydicom calls and drop
        # the sample under way; this way every sample in the partial result is whole.
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, on_sigint)

    def emit(event: dict) -> None:
        print(EVENT_PREFIX + json.dumps(event), flush=True)
        if stop_requested and event["event"] == "progress":
            raise KeyboardInterrupt

    from edgevlm.errors import EdgeVLMError

    result: dict[str, Any] = {"complete": False}
    try:
        run_config(spec, emit, result)
    except EdgeVLMError as e:  # a user-caused problem (missing checkpoint for torch, bad study): one line
        emit({"event": "error", "message": str(e).replace("\n", " ")})
        emit({"event": "result", "result": finalize(result)})
        return 2
    except KeyboardInterrupt:
        emit({"event": "result", "result": finalize(result)})
        return 130
    emit({"event": "result", "result": finalize(result)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
