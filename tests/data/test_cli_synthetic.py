from __future__ import annotations

import json

from typer.testing import CliRunner

from edgevlm.cli import app


def test_make_synthetic_command(tmp_path, monkeypatch):
    import edgevlm.data.dicom as dicom_mod

    real = dicom_mod.sample_study

    def short(seed, config=None):  # a few slices per study keeps the test quick
        s = real(seed, config)
        s.n_slices = 2
        return s

    monkeypatch.setattr(dicom_mod, "sample_study", short)
    out = tmp_path / "syn"
    result = CliRunner().invoke(app, ["studies", "make-synthetic", "-o", str(out), "--n", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote 2 studies" in result.output
    index = json.loads((out / "studies.json").read_text())
    assert [e["seed"] for e in index["studies"]] == [3, 4]
    again = CliRunner().invoke(app, ["studies", "make-synthetic", "-o", str(out), "--n", "1", "--seed", "3"])
    assert again.exit_code == 2 and "--overwrite" in again.output
