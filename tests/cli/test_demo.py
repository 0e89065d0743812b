"""`edgevlm demo`, the README's main job, end to end on the shipped model (export cached in tmp)."""

import pytest
from typer.testing import CliRunner

from edgevlm.cli import app


@pytest.mark.slow
def test_demo_prints_report_and_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    result = runner.invoke(app, ["demo", "--threads", "2"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "generated report" in out and "ground truth" in out
    assert "FINDINGS" in out and "IMPRESSION" in out
    for stage in ("load", "read study", "preprocess", "vision", "prefill", "decode", "total", "peak RSS"):
        assert stage in out
    bundles = list((tmp_path / "cache").glob("demo-teacher-*"))
    assert len(bundles) == 1 and (bundles[0] / "manifest.json").exists()
    # Second run reuses the verified cached bundle instead of exporting again.
    again = runner.invoke(app, ["demo", "--threads", "2"])
    assert again.exit_code == 0 and "exporting" not in again.output
