"""benchmarks/kernels.py must stay runnable: a GPU session gets one shot at it. Its --smoke-cpu mode
runs every code path (checks, timing, Flex block mask, table, JSON) on tiny shapes via the interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_smoke_runs_on_cpu(tmp_path):
    pytest.importorskip("triton")
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--smoke-cpu", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (path,) = tmp_path.glob("kernels-*.json")
    record = json.loads(path.read_text())
    assert record["patch_embed"] and record["attention"] and record["correctness_sweep"]
    assert all(r["ok"] for r in record["patch_embed"] + record["attention"] + record["correctness_sweep"])
    assert all(r["rel_err_flex_vs_ours"] is not None for r in record["attention"]), "Flex column must be filled"
