import json

from typer.testing import CliRunner

from edgevlm import __version__
from edgevlm.checkpoint import save_checkpoint
from edgevlm.cli import app
from edgevlm.models import PRESETS, MedVLM

runner = CliRunner()


def test_version_and_help():
    assert __version__ in runner.invoke(app, ["--version"]).output
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "info" in result.output


def test_info_on_m3d_shaped_config_counts_vit_b_exactly(tmp_path, monkeypatch):
    """87,389,184 = M3D's ViT-B: 12 blocks without qkv bias, Linear 1024->768, 2048x768 pos, CLS, norm.
    Counting happens on the meta device: every model info builds must hold meta tensors only."""
    cfg_file = tmp_path / "m3d.json"
    cfg_file.write_text(PRESETS["m3d-lamed-phi3"]().to_json())
    built_on = []
    real_init = MedVLM.__init__

    def spy_init(self, cfg):
        real_init(self, cfg)
        built_on.append({p.device.type for p in self.parameters()})

    monkeypatch.setattr(MedVLM, "__init__", spy_init)
    result = runner.invoke(app, ["info", str(cfg_file), "--json"])
    assert result.exit_code == 0, result.output
    assert built_on and all(devices == {"meta"} for devices in built_on), built_on
    summary = json.loads(result.output)
    assert summary["params"]["vision_encoder"] == 87_389_184
    assert summary["params"]["decoder_embeddings"] == 32015 * 3072
    assert summary["visual_tokens"] == 256
    assert summary["weight_bytes"]["fp16"] == summary["params_total"] * 2


def test_info_on_checkpoint_prints_table(tmp_path):
    cfg = PRESETS["demo-tiny"]()
    cfg.decoder.n_layers = 1
    cfg.vision.depth = 1
    path = save_checkpoint(MedVLM(cfg), tmp_path / "demo.safetensors")
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "vision encoder" in result.output and "int4" in result.output


def test_info_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["info", str(bad)])
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and "bad.ckpt" in lines[0] and "Traceback" not in result.output
