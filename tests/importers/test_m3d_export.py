"""An M3D-LaMed folder goes straight into `edgevlm export` (auto-detected or --from m3d-lamed), and the
bundle runs on both backends: the torch backend re-reads the M3D folder through the importer."""

import numpy as np
from edgevlm.export import ParityConfig, export_bundle
from typer.testing import CliRunner

from edgevlm.cli import app
from edgevlm.models.tokenizer import train_tokenizer
from edgevlm.runtime import load_bundle


def _tokenizer_json(tmp_path):
    # M3D ships a sentencepiece model; the test stands in a small tokenizer with M3D's special tokens.
    tok = train_tokenizer(["no pleural effusion", "a nodule in the right upper lobe"] * 20, 300,
                          ["<|endoftext|>", "<s>", "<unk>", "<im_patch>"])
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    return path


def test_m3d_folder_exports_and_runs_on_both_backends(make_m3d, tmp_path):
    folder, _ = make_m3d("phi3")
    tokenizer = _tokenizer_json(tmp_path)
    bundle = export_bundle(folder, tmp_path / "bundle", tokenizer_json=tokenizer.read_text(),
                           parity=ParityConfig(n_volumes=1, max_new_tokens=3), from_="m3d-lamed")
    volume = np.random.default_rng(0).random((32, 256, 256), dtype=np.float32)
    ort = load_bundle(bundle, backend="ort").generate(volume, "What is shown?", max_new_tokens=4, ignore_stop=True)
    torch_ = load_bundle(bundle, backend="torch").generate(volume, "What is shown?", max_new_tokens=4,
                                                           ignore_stop=True)
    assert len(ort.token_ids) == 4 and ort.token_ids == torch_.token_ids
    assert load_bundle(bundle).bundle.manifest["source"]["kind"] == "m3d-lamed"


def test_export_cli_takes_from_flag(make_m3d, tmp_path):
    folder, _ = make_m3d("phi3")
    result = CliRunner().invoke(app, ["export", str(folder), "-o", str(tmp_path / "b"), "--from", "m3d-lamed",
                                      "--tokenizer", str(_tokenizer_json(tmp_path)), "--parity-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "manifest.json").exists()
