"""`edgevlm bench` end to end on a tiny random-weight bundle (synthetic:2, small matrix, 1 repeat): the
results validate against the shipped JSON Schema, hold no study id or path, the HTML is self-contained,
compare merges two runs, and an interrupted run keeps what it measured."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from edgevlm.bench import BenchOptions, compare_results, load_results, run_bench, schema
from edgevlm.bench.report import render_html
from edgevlm.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def bench_run(gqa_bundle, tmp_path_factory) -> Path:
    _, bundle = gqa_bundle
    out = tmp_path_factory.mktemp("bench")
    req = out / "req.toml"
    req.write_text('name = "smoke"\nmax_p90_seconds_per_study = 600\nmax_host_ram_gb = 64\nmax_vram_gb = 8\n'
                   "min_accuracy_fraction_of_reference = 0.99\n")
    result = runner.invoke(app, ["bench", "--bundle", str(bundle), "--reference", str(bundle), "--studies",
                                 "synthetic:2", "--synthetic-matrix", "48", "--repeats", "1", "--batch-sizes", "1,2",
                                 "--threads", "1", "--max-new-tokens", "6", "--requirements", str(req), "-o",
                                 str(out / "run")])
    assert result.exit_code == 0, result.output
    return out / "run"


def test_results_validate_and_hold_the_measurements(bench_run):
    doc = json.loads((bench_run / "results.json").read_text())
    jsonschema.validate(doc, schema())
    assert doc["status"] == "complete" and doc["kind"] == "bench"
    (c,) = doc["configurations"]
    ss = c["single_stream"]
    assert ss["warmup_runs"] == 1 and ss["n_samples"] == 2 and ss["latency_ms"]["n"] == 2
    assert all(s["latency_ms"] >= s["ttft_ms"] > 0 and s["n_new_tokens"] <= 6 for s in ss["samples"])
    assert [e["batch_size"] for e in c["offline"]["tried"]] == [1, 2] and c["offline"]["studies_per_hour"] > 0
    assert c["load"]["cold_start"]["wall_ms"][0] > c["load"]["bundle_load_ms"] > 0
    assert c["memory"]["peak_rss_bytes"] > 0 and c["memory"]["timeline"]["rss_bytes"]
    assert c["accuracy"]["n_studies"] == 2
    # Its own reference: every token agrees; F1 fraction is undefined when random weights score 0.
    assert c["reference_agreement"]["token_agreement"] == 1.0
    assert c["reference_agreement"]["exact_match_rate"] == 1.0
    statuses = {ch["requirement"]: ch["status"] for ch in c["checks"]}
    assert statuses["max_p90_seconds_per_study"] == "pass" and statuses["max_vram_gb"] == "pass"  # CPU
    assert statuses["min_accuracy_fraction_of_reference"] == "unknown" and c["verdict"] == "incomplete"
    run = doc["runs"][0]
    assert run["settings"]["percentile_method"].startswith("linear")
    assert run["study_set"]["n_studies"] == 2 and len(run["study_set"]["content_sha256"]) == 64
    f = run["fingerprint"]
    assert f["cpu"]["logical_cores"] and f["python"]["version"] and f["libraries"]["onnxruntime"]
    report = (bench_run / "report.md").read_text()
    assert c["bundle"]["bundle_id"] in report
    from edgevlm.bench.fingerprint import cpu_isa

    assert f["cpu"]["isa"] == cpu_isa()  # int8 speed depends on them: the report states which the CPU has
    assert f"int8/bf16 ISA: {' '.join(cpu_isa()) or 'none detected'}" in report


def test_no_study_ids_or_paths_in_outputs(bench_run, gqa_bundle):
    text = "".join((bench_run / name).read_text() for name in ("results.json", "report.md", "report.html"))
    assert "SYN1000000" not in text and "edgevlm-bench-" not in text  # study ids, the scratch folder
    assert str(gqa_bundle[1].parent) not in text and str(bench_run) not in text


def test_html_is_self_contained(bench_run):
    html = (bench_run / "report.html").read_text()
    assert "<svg" in html and "Summary" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"https?://|@import|<script|<link|url\(", html, re.I)


def test_compare_merges_two_machines(bench_run, tmp_path):
    a = load_results(bench_run)
    b = copy.deepcopy(a)  # workstation B: the same measurements under another run
    b["runs"][0]["run_id"] = "b" * 12
    b["runs"][0]["label"] = "Workstation B"
    for c in b["configurations"]:
        c["run_id"] = "b" * 12
        c["single_stream"]["latency_ms"]["p90"] = 10 ** 7  # 10 000 s: fails max_p90_seconds_per_study
    doc = compare_results([a, b])
    jsonschema.validate(doc, schema())
    assert doc["kind"] == "compare" and len(doc["runs"]) == 2 and len(doc["configurations"]) == 2
    assert doc["configurations"][1]["label"].startswith("Workstation B: ")
    assert [c["verdict"] for c in doc["configurations"]] == ["incomplete", "fail"]  # F1 fraction unknown in A
    assert doc["notes"] == []  # same study set
    b_path = tmp_path / "b" / "results.json"
    b_path.parent.mkdir()
    b_path.write_text(json.dumps(b))
    result = runner.invoke(app, ["bench", "compare", str(bench_run / "results.json"), str(b_path), "-o",
                                 str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    merged = load_results(tmp_path / "cmp")
    assert {r["label"] for r in merged["runs"]} == {a["runs"][0]["label"], "Workstation B"}
    assert "Workstation B" in (tmp_path / "cmp" / "report.html").read_text()
    assert "Workstation B" in render_html(merged)


def test_compare_needs_two_runs(bench_run):
    result = runner.invoke(app, ["bench", "compare", str(bench_run / "results.json"), "-o", "x"])
    assert result.exit_code == 2 and "at least two" in result.output


def test_bad_input_is_one_error_line(tmp_path, gqa_bundle):
    result = runner.invoke(app, ["bench", "--bundle", str(tmp_path / "missing"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no such bundle folder" in result.output and "Traceback" not in result.output
    req = tmp_path / "r.toml"
    req.write_text("max_p95 = 1\n")
    result = runner.invoke(app, ["bench", "--bundle", str(gqa_bundle[1]), "--requirements", str(req), "-o",
                                 str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown requirement" in result.output


def test_interrupt_keeps_completed_measurements(gqa_bundle, tmp_path):
    """Ctrl-C while the worker runs: the worker gets SIGINT, reports what it measured, and the parent
    writes results.json with status "interrupted" (KeyboardInterrupt raised from the progress callback,
    the same place a terminal Ctrl-C lands in the parent)."""
    _, bundle = gqa_bundle
    seen = []

    def on_event(config_id: str, event: dict) -> None:
        seen.append(event)
        if event.get("phase") == "single stream" and event["done"] >= 3:
            raise KeyboardInterrupt

    opts = BenchOptions(bundles=[bundle], studies="synthetic:1", out=tmp_path / "out", repeats=500, threads=1,
                        max_new_tokens=4, synthetic_matrix=48, cold_starts=0, argv=["edgevlm", "bench"])
    with pytest.raises(KeyboardInterrupt):
        run_bench(opts, on_event)
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    jsonschema.validate(doc, schema())
    assert doc["status"] == "interrupted"
    (c,) = doc["configurations"]
    assert not c["complete"] and c["single_stream"]["n_samples"] >= 3 and c["offline"] is None
    assert c["single_stream"]["latency_ms"]["p90"] > 0
    assert "interrupted" in (tmp_path / "out" / "report.html").read_text()
