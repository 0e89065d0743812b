"""`run_bench`: every (bundle, backend) configuration measured in its own worker process, merged into one
results document that is rewritten after each configuration (a Ctrl-C keeps what finished).

Order per configuration: the worker (load, single stream, offline, accuracy), then cold starts (fresh
`edgevlm infer` processes, after the worker exited so the two never share the machine). Then the
reference bundle's accuracy when it is not one of the benchmarked bundles, agreement with it, and the
requirement checks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevlm.bench import results as res
from edgevlm.bench.accuracy import agreement
from edgevlm.bench.fingerprint import environment, machine_label, path_tag, redact_argv, sha256_text
from edgevlm.bench.requirements import apply_checks, load_requirements
from edgevlm.bench.stats import PERCENTILE_METHOD, summarize
from edgevlm.bench.studies import describe, find_studies, parse_source, write_synthetic
from edgevlm.bench.worker import EVENT_PREFIX
from edgevlm.errors import EdgeVLMError

OnEvent = Callable[[str, dict[str, Any]], None]  # (config_id, event)
SCENARIOS = ("single_stream", "offline", "accuracy")


@dataclass
class BenchOptions:
    bundles: list[Path]
    studies: str  # a folder or synthetic:N
    out: Path
    backends: list[str] = field(default_factory=lambda: ["ort"])
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    threads: int | None = None
    max_new_tokens: int | None = None
    cold_starts: int = 1
    reference: Path | None = None
    requirements: Path | None = None
    label: str | None = None  # the machine's name in reports ("Workstation A")
    synthetic_matrix: int = 512
    argv: list[str] = field(default_factory=lambda: list(sys.argv))

    def check(self) -> None:
        for name, value, low in (("--repeats", self.repeats, 1), ("--warmup", self.warmup, 0),
                                 ("--cold-starts", self.cold_starts, 0)):
            if value < low:
                raise EdgeVLMError(f"{name} must be >= {low}, got {value}")
        if not self.bundles:
            raise EdgeVLMError("give at least one --bundle")
        bad = [b for b in self.backends if b not in ("ort", "torch")]
        if bad:
            raise EdgeVLMError(f"unknown backend {bad[0]!r}; choose ort or torch")
        if any(b < 1 for b in self.batch_sizes):
            raise EdgeVLMError(f"--batch-sizes must be positive, got {self.batch_sizes}")


def bundle_info(path: Path) -> dict[str, Any]:
    """What a reviewer needs to know about a bundle, read from its manifest (no path in clear)."""
    from edgevlm.runtime import verify_bundle

    b = verify_bundle(path, check_hashes=False)  # hashes are checked by every load in the workers
    m = b.manifest
    files = [f for f in Path(path).rglob("*") if f.is_file()]
    parity = m.get("parity") or {}
    gen = parity.get("generation") or []
    return {
        "name": Path(path).resolve().name,
        "path_tag": path_tag(path, keep_name=True),
        "bundle_id": b.bundle_id,
        "model": (m.get("model") or {}).get("name"),
        "precision": m.get("precision"),
        "size_bytes": sum(f.stat().st_size for f in files),
        "n_files": len(files),
        "source_sha256": (m.get("source") or {}).get("sha256"),
        "exported_with": m.get("edgevlm_version"),
        "created": m.get("created"),
        "quantization": m.get("quantization"),
        "export_parity": {"vision_cosine_min": parity.get("vision_cosine_min"),
                          "logits_max_abs_diff": parity.get("logits_max_abs_diff"),
                          "greedy_runs_equal": sum(bool(g.get("tokens_equal")) for g in gen), "greedy_runs": len(gen)},
        "export_accuracy": m.get("accuracy"),
    }


def _config_label(info: dict[str, Any], backend: str, taken: set[str]) -> str:
    label = f"{info['name']} · {backend}"
    return f"{info['name']}-{info['bundle_id'][:6]} · {backend}" if label in taken else label


def run_worker(spec: dict[str, Any], on_event: Callable[[dict[str, Any]], None], scratch: Path) -> dict[str, Any]:
    """Run one configuration in `python -m edgevlm.bench.worker`; its result, or one with "error" set.

    The worker runs in a session of its own so a terminal Ctrl-C reaches only this process, which
    forwards exactly one SIGINT and then waits for the worker's partial result.
    """
    spec_path = scratch / f"spec-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    stderr_path = spec_path.with_suffix(".stderr")
    result: dict[str, Any] | None = None
    errors: list[str] = []

    def handle(line: str, forward: bool = True) -> None:
        nonlocal result
        if not line.startswith(EVENT_PREFIX):
            return  # a library printing to stdout; events are only the prefixed lines
        event = json.loads(line[len(EVENT_PREFIX):])
        if event["event"] == "result":
            result = event["result"]
        elif event["event"] == "error":
            errors.append(event["message"])
        elif forward:
            on_event(event)

    with open(stderr_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edgevlm.bench.worker", str(spec_path)], stdout=subprocess.PIPE,
                                stderr=err, text=True, start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                handle(line.rstrip("\n"))
            proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            try:
                rest, _ = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:  # a worker stuck in native code: give up on its partial result
                proc.kill()
                rest, _ = proc.communicate()
            # Progress the worker sent after the interrupt is not passed on: the caller is stopping, and its
            # handler raising again here (as the one that stopped it did) would lose the partial result.
            for line in (rest or "").splitlines():
                handle(line, forward=False)
            raise _Interrupted(result) from None
    if result is None or errors or proc.returncode != 0:
        tail = stderr_path.read_text().strip().splitlines()[-3:]
        result = result or {"complete": False}
        result["error"] = "; ".join(errors) or f"worker exited with status {proc.returncode}: {' | '.join(tail)[:400]}"
    return result


class _Interrupted(Exception):
    """Ctrl-C while a worker ran; carries the worker's partial result."""

    def __init__(self, partial: dict[str, Any] | None):
        self.partial = partial


def cold_start(bundle: Path, backend: str, study: str, threads: int | None, max_new_tokens: int | None,
               n: int, scratch: Path) -> dict[str, Any] | None:
    """Process start to first result: `edgevlm infer` in a fresh interpreter, timed from outside."""
    if n == 0:
        return None
    json_path = scratch / "cold.json"
    cmd = [sys.executable, "-c", "import sys; from edgevlm.cli import main; sys.argv[0] = 'edgevlm'; main()",
           "infer", study, "--bundle", str(bundle), "--backend", backend, "--json", str(json_path)]
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--max-new-tokens", str(max_new_tokens)] if max_new_tokens else []
    walls, first = [], None
    for _ in range(n):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, start_new_session=True)
        walls.append((time.perf_counter() - start) * 1000)
        if proc.returncode != 0:
            return {"n": len(walls) - 1, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
        first = first or json.loads(json_path.read_text())
    assert first is not None
    t = first["timings_ms"]
    return {"n": n, "wall_ms": walls, "summary": summarize(walls),
            "breakdown_ms": {"load": t["load"], "read_study": t["read_study"], "generate": t["total"],
                             "interpreter_and_imports": walls[0] - t["load"] - t["read_study"] - t["total"]},
            "peak_rss_bytes": first["memory"]["peak_rss_bytes"],
            "note": "wall time of `edgevlm infer` in a new process (imports, bundle verify + load, read study, "
                    "generate, exit); the OS file cache is warm"}


def _config_from_worker(entry: dict[str, Any], w: dict[str, Any]) -> None:
    entry["complete"] = bool(w.get("complete")) and not w.get("error")
    entry["error"] = w.get("error")
    entry["backend"].update(providers=w.get("providers"), device=w.get("device"), threads=w.get("threads"))
    entry["load"]["bundle_load_ms"] = w.get("bundle_load_ms")
    for key in ("single_stream", "offline", "memory", "accuracy"):
        entry[key] = w.get(key)
    entry["_outputs"] = w.get("outputs")


def _finish(doc: dict[str, Any], ref_outputs: dict[str, Any] | None) -> None:
    """Agreement with the reference and requirement checks over what has been measured so far."""
    run = doc["runs"][0]
    ref = run["reference"]
    for c in doc["configurations"]:
        c["reference_agreement"] = None
        if ref and ref_outputs is not None and c.get("_outputs") is not None and c.get("accuracy") is not None:
            c["reference_agreement"] = agreement(c["_outputs"], c["accuracy"], ref_outputs["outputs"],
                                                 ref.get("accuracy"), ref["label"])
    apply_checks(doc)



def run_bench(opts: BenchOptions, on_event: OnEvent | None = None,
              on_status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every (bundle, backend) and write results.json, report.md and report.html under opts.out."""
    opts.check()
    on_event = on_event or (lambda cid, e: None)
    status = on_status or (lambda msg: None)
    requirements = load_requirements(opts.requirements) if opts.requirements else None
    infos = [bundle_info(b) for b in opts.bundles]
    ref_info = bundle_info(opts.reference) if opts.reference else None
    scratch = Path(tempfile.mkdtemp(prefix="edgevlm-bench-"))
    try:
        n_synth = parse_source(opts.studies)
        if n_synth is not None:
            status(f"writing {n_synth} synthetic studies as DICOM (held-out seeds)")
            refs = find_studies(write_synthetic(n_synth, scratch / "studies", opts.synthetic_matrix))
        else:
            refs = find_studies(Path(opts.studies))
        status(f"hashing {len(refs)} studies")
        study_set = describe(opts.studies, refs, opts.synthetic_matrix)
        env = environment()
        command = redact_argv(opts.argv)
        run_id = sha256_text(command + env["cpu"]["model"] + time.strftime("%Y%m%dT%H%M%S"))[:12]
        settings = {"repeats": opts.repeats, "warmup_runs": opts.warmup, "seed": opts.seed,
                    "batch_sizes": opts.batch_sizes, "threads": opts.threads, "max_new_tokens": opts.max_new_tokens,
                    "cold_starts": opts.cold_starts, "backends": opts.backends,
                    "percentile_method": PERCENTILE_METHOD, "scenarios": list(SCENARIOS)}
        run = {"run_id": run_id, "label": opts.label or machine_label(env), "command": command,
               "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "finished_utc": None,
               "fingerprint": env, "study_set": study_set, "settings": settings, "requirements": requirements,
               "reference": None if ref_info is None else {"label": ref_info["name"], "bundle": ref_info,
                                                          "accuracy": None}}
        doc = res.new_document("bench", [run])
        taken: set[str] = set()
        for info in infos:
            for backend in opts.backends:
                label = _config_label(info, backend, taken)
                taken.add(label)
                doc["configurations"].append({
                    "config_id": f"{run_id}/{label}", "run_id": run_id, "label": label, "complete": False,
                    "error": None, "bundle": info, "backend": {"name": backend},
                    "load": {"bundle_load_ms": None, "cold_start": None},
                    **dict.fromkeys(("single_stream", "offline", "memory", "accuracy", "reference_agreement"))})
        spec_base = {"threads": opts.threads, "studies": [r.to_dict() for r in refs], "repeats": opts.repeats,
                     "warmup": opts.warmup, "seed": opts.seed, "batch_sizes": opts.batch_sizes,
                     "max_new_tokens": opts.max_new_tokens}
        ref_outputs: dict[str, Any] | None = None

        def write() -> None:  # after every configuration: an interrupted run keeps what finished
            _finish(doc, ref_outputs)
            res.write_outputs(doc, opts.out)

        write()
        try:
            for entry, bundle in zip(doc["configurations"],
                                     [b for b in opts.bundles for _ in opts.backends], strict=True):
                cid = entry["config_id"]
                spec = {**spec_base, "bundle": str(Path(bundle).resolve()), "backend": entry["backend"]["name"],
                        "scenarios": list(SCENARIOS)}
                try:
                    w = run_worker(spec, lambda e, cid=cid: on_event(cid, e), scratch)
                except _Interrupted as stop:
                    _config_from_worker(entry, stop.partial or {"complete": False})
                    raise KeyboardInterrupt from None
                _config_from_worker(entry, w)
                on_event(cid, {"event": "progress", "phase": "cold start", "done": 0, "total": 1})
                entry["load"]["cold_start"] = cold_start(bundle, entry["backend"]["name"], refs[0].path, opts.threads,
                                                         opts.max_new_tokens, opts.cold_starts, scratch)
                on_event(cid, {"event": "done", "complete": entry["complete"], "error": entry["error"]})
                if ref_info and entry["bundle"]["bundle_id"] == ref_info["bundle_id"] and ref_outputs is None \
                        and entry.get("accuracy") is not None:
                    ref_outputs = {"outputs": entry["_outputs"]}
                    run["reference"]["accuracy"] = entry["accuracy"]
                write()
            if ref_info and ref_outputs is None:
                status(f"reference {ref_info['name']}: accuracy pass")
                spec = {**spec_base, "bundle": str(Path(opts.reference).resolve()), "backend": "ort",
                        "scenarios": ["accuracy"]}
                try:
                    w = run_worker(spec, lambda e: on_event("reference", e), scratch)
                except _Interrupted:
                    raise KeyboardInterrupt from None
                if w.get("error"):
                    run["reference"]["error"] = w["error"]
                else:
                    ref_outputs = {"outputs": w.get("outputs")}
                    run["reference"]["accuracy"] = w.get("accuracy")
            doc["status"] = "complete"
        except KeyboardInterrupt:
            doc["status"] = "interrupted"
            raise
        finally:
            run["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            env["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
            write()
        return doc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
