"""Percentiles (linear interpolation, stated), requirement parsing, pass/fail and verdict logic."""

from __future__ import annotations

import math

import pytest

from edgevlm.bench import apply_checks, check, parse_requirements, percentile, summarize, verdict
from edgevlm.bench.accuracy import agreement, token_agreement
from edgevlm.bench.fingerprint import cpu_isa, path_tag, redact_argv
from edgevlm.bench.requirements import GB, load_requirements
from edgevlm.errors import EdgeVLMError


def test_percentile_linear_interpolation_on_known_inputs():
    # rank h = (n - 1) q / 100; value = x[floor h] + frac(h) * (x[floor h + 1] - x[floor h])
    x = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(x, 50) == pytest.approx(2.5)  # h = 1.5
    assert percentile(x, 90) == pytest.approx(3.7)  # h = 2.7 -> 3 + 0.7 * 1
    assert percentile(x, 99) == pytest.approx(3.97)
    assert percentile(x, 0) == 1.0 and percentile(x, 100) == 4.0
    assert percentile(list(range(1, 11)), 90) == pytest.approx(9.1)  # h = 8.1 over 1..10
    assert percentile([7.0], 90) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(x, 101)


def test_summarize_counts_and_skips_missing():
    s = summarize([1.0, 2.0, 3.0, None, math.nan])
    assert s["n"] == 3 and s["p50"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0
    assert s["std"] == pytest.approx(1.0) and s["p25"] == 1.5
    assert summarize([])["p90"] is None


def _config(p90_ms=2000.0, rss=3 * GB, device="cpu", vram=None, f1=0.8, frac=0.995, error=None):
    return {"run_id": "r", "error": error, "backend": {"name": "ort", "device": device},
            "single_stream": {"latency_ms": {"p50": p90_ms / 2, "p90": p90_ms}},
            "memory": {"peak_rss_bytes": rss, "peak_vram_bytes": vram, "vram_source": "nvml"},
            "bundle": {"size_bytes": GB // 2}, "accuracy": {"finding_micro_f1": f1, "closed_accuracy": 0.9},
            "reference_agreement": None if frac is None else {"f1_fraction_of_reference": frac},
            "offline": {"studies_per_hour": 1000.0}, "load": {"cold_start": None}}


def test_requirements_parse_top_level_or_table(tmp_path):
    f = tmp_path / "req.toml"
    f.write_text('name = "Tender A"\nmax_p90_seconds_per_study = 3\nmax_vram_gb = 12\n')
    assert load_requirements(f) == {"name": "Tender A", "limits": {"max_p90_seconds_per_study": 3.0,
                                                                   "max_vram_gb": 12.0}}
    f.write_text('[requirements]\nname = "B"\nmin_finding_f1 = 0.5\n')
    assert load_requirements(f)["limits"] == {"min_finding_f1": 0.5}
    with pytest.raises(EdgeVLMError, match="unknown requirement 'max_p95_seconds'"):
        parse_requirements({"max_p95_seconds": 1})
    with pytest.raises(EdgeVLMError, match="must be a number"):
        parse_requirements({"max_vram_gb": "12"})
    f.write_text("max_vram_gb = = 3")
    with pytest.raises(EdgeVLMError, match="not valid TOML"):
        load_requirements(f)


def test_checks_pass_fail_unknown_and_verdict():
    limits = {"max_p90_seconds_per_study": 3.0, "max_host_ram_gb": 4.0, "max_vram_gb": 12.0, "min_finding_f1": 0.5,
              "min_accuracy_fraction_of_reference": 0.99}
    ok = check(_config(), limits)
    assert {c["requirement"]: c["status"] for c in ok} == dict.fromkeys(limits, "pass")
    vram = next(c for c in ok if c["requirement"] == "max_vram_gb")
    assert vram["value"] == 0.0 and "CPU" in vram["note"]  # a CPU run uses no GPU memory
    assert verdict(ok) == "pass"
    slow = check(_config(p90_ms=3001.0), limits)
    assert next(c for c in slow if c["requirement"] == "max_p90_seconds_per_study")["status"] == "fail"
    assert verdict(slow) == "fail"
    assert check(_config(p90_ms=3000.0), limits)[0]["status"] == "pass"  # the limit itself passes
    # On a GPU with no memory figure, and with no reference: unknown, so the verdict is incomplete.
    unknown = check(_config(device="cuda", vram=None, frac=None), limits)
    assert {c["requirement"]: c["status"] for c in unknown}["max_vram_gb"] == "unknown"
    assert verdict(unknown) == "incomplete"
    assert verdict(check(_config(device="cuda", vram=13 * GB), limits)) == "fail"
    assert verdict(check(_config(f1=0.4), {"min_finding_f1": 0.5})) == "fail"
    assert verdict(None) == "not checked"


def test_apply_checks_uses_run_requirements_and_marks_errors():
    doc = {"runs": [{"run_id": "r", "requirements": {"name": None, "limits": {"max_host_ram_gb": 4.0}}}],
           "configurations": [_config(), _config(rss=5 * GB), _config(error="worker exited")]}
    apply_checks(doc)
    assert [c["verdict"] for c in doc["configurations"]] == ["pass", "fail", "error"]


def test_agreement_and_fraction_of_reference():
    assert token_agreement([1, 2, 3], [1, 2, 4, 5]) == (2, 4)
    ref = [{"key": "a", "token_ids": [[1, 2, 3], [7]], "texts": ["x", "yes"]}]
    out = [{"key": "a", "token_ids": [[1, 2, 4], [7]], "texts": ["z", "yes"]}]
    a = agreement(out, {"finding_micro_f1": 0.792, "closed_accuracy": 1.0}, ref,
                  {"finding_micro_f1": 0.8, "closed_accuracy": 1.0}, "fp32")
    assert a["token_agreement"] == pytest.approx(3 / 4)
    assert a["exact_match_rate"] == 0.5 and a["report_exact_match_rate"] == 0.0
    assert a["f1_fraction_of_reference"] == pytest.approx(0.99) and a["meets_99"] and not a["meets_99_9"]
    assert a["finding_f1_delta"] == pytest.approx(-0.008)
    zero = agreement(out, {"finding_micro_f1": 0.0}, ref, {"finding_micro_f1": 0.0}, "fp32")
    assert zero["f1_fraction_of_reference"] is None and zero["meets_99"] is None


def test_command_line_paths_are_tagged(tmp_path):
    studies = tmp_path / "Doe^John"
    studies.mkdir()
    line = redact_argv(["/usr/bin/edgevlm", "bench", "--bundle", str(tmp_path / "m-int4"), "--studies", str(studies),
                        "--repeats", "2", f"--reference={tmp_path / 'm-fp32'}"])
    assert "Doe" not in line and str(tmp_path) not in line
    assert f"--bundle {path_tag(tmp_path / 'm-int4', keep_name=True)}" in line and "m-int4@" in line
    assert "--studies path@" in line and "--reference=m-fp32@" in line
    assert "--repeats 2" in line and line.startswith("edgevlm bench")
    assert "synthetic:4" in redact_argv(["edgevlm", "bench", "--studies", "synthetic:4"])


def test_cpu_isa_reads_the_quantization_relevant_flags(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_int8 "
                   "avx512_bf16x\n")
    assert cpu_isa(x86) == ["avx2", "avx512f", "avx512_vnni", "amx_int8"]  # whole words only
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n")
    assert cpu_isa(arm) == ["asimd", "asimddp", "i8mm"]
    assert cpu_isa(tmp_path / "missing") == []
