import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from edgevlm.checkpoint import load_checkpoint, read_config, save_checkpoint
from edgevlm.errors import EdgeVLMError
from edgevlm.models import DecoderConfig, MedVLM, MedVLMConfig, ProjectorConfig, VisionConfig


@pytest.fixture
def model() -> MedVLM:
    cfg = MedVLMConfig(
        name="ckpt-test",
        vision=VisionConfig(image_size=(4, 8, 8), patch_size=(2, 4, 4), dim=16, depth=1, heads=2, mlp_dim=32),
        projector=ProjectorConfig(kind="mlp"),
        decoder=DecoderConfig(vocab_size=50, dim=24, n_layers=1, n_heads=2, intermediate_size=48, max_seq_len=32,
                              tie_embeddings=True),
    )
    return MedVLM(cfg).eval()


def _outputs(m: MedVLM) -> torch.Tensor:
    torch.manual_seed(123)
    volume = torch.randn(1, 1, 4, 8, 8)
    ids = torch.tensor([[1] + [3] * m.cfg.num_visual_tokens + [7, 8, 9]])
    with torch.no_grad():
        return m(volume, ids, 3)


def test_three_formats_load_into_identical_models(model, tmp_path: Path):
    ref = _outputs(model)
    state = model.state_dict()
    # (a) native
    native = save_checkpoint(model, tmp_path / "m.safetensors", tokenizer_json='{"x": 1}', extra={"seed": 3})
    # (b) Lightning-style .ckpt with a "model." prefix and hyper_parameters
    lightning = tmp_path / "m.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()},
                "hyper_parameters": {"config": model.cfg.to_dict()}, "epoch": 3}, lightning)
    # (c) HF-style directory with two shards and an index
    hf = tmp_path / "hf"
    hf.mkdir()
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k].clone().contiguous() for k in keys if k != "decoder.lm_head.weight"}, hf / shard)
        weight_map.update({k: shard for k in keys})
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (hf / "config.json").write_text(model.cfg.to_json())

    loaded = [load_checkpoint(p) for p in (native, lightning, hf)]
    assert [c.kind for c in loaded] == ["edgevlm", "torch", "hf-dir"]
    for ckpt in loaded:
        assert ckpt.config == model.cfg
        torch.testing.assert_close(_outputs(ckpt.model), ref, rtol=0, atol=0)
    assert loaded[0].tokenizer_json == '{"x": 1}' and loaded[0].extra == {"seed": 3}


def test_bare_state_dict_needs_config_flag(model, tmp_path: Path):
    path = tmp_path / "bare.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(EdgeVLMError, match="--config"):
        load_checkpoint(path)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(model.cfg.to_json())
    torch.testing.assert_close(_outputs(load_checkpoint(path, config=cfg_file).model), _outputs(model))


class _Payload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def test_malicious_pickle_is_refused_and_never_executed(model, tmp_path: Path):
    target = tmp_path / "written_by_pickle.txt"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": model.state_dict(), "hook": _Payload(str(target))}, f)
    with pytest.raises(EdgeVLMError, match="code execution"):
        load_checkpoint(evil, config=model.cfg)
    assert not target.exists()
    # the same payload inside torch.save's zip format
    torch.save({"state_dict": model.state_dict(), "hook": _Payload(str(target))}, tmp_path / "evil2.pt")
    with pytest.raises(EdgeVLMError, match="code execution"):
        load_checkpoint(tmp_path / "evil2.pt", config=model.cfg)
    assert not target.exists()


def test_missing_key_is_named(model, tmp_path: Path):
    state = {k: v for k, v in model.state_dict().items() if k != "decoder.layers.0.mlp.up_proj.weight"}
    state.pop("decoder.lm_head.weight")
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"config": model.cfg.to_dict()}}, path)
    with pytest.raises(EdgeVLMError, match=r"missing key\(s\): decoder\.layers\.0\.mlp\.up_proj\.weight"):
        load_checkpoint(path)


def test_unexpected_and_misshaped_keys_are_named(model, tmp_path: Path):
    state = dict(model.state_dict())
    state["vision.extra.weight"] = torch.zeros(2)
    state["projector.linear1.bias"] = torch.zeros(3)
    path = tmp_path / "m.pt"
    torch.save(state, path)
    with pytest.raises(EdgeVLMError) as err:
        load_checkpoint(path, config=model.cfg)
    assert "unexpected key(s): vision.extra.weight" in str(err.value)
    assert "projector.linear1.bias (3,)" in str(err.value)


def test_garbage_files_get_one_line_errors(tmp_path: Path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(EdgeVLMError, match="safetensors"):
        read_config(junk)
    text = tmp_path / "junk.ckpt"
    text.write_text("hello")
    with pytest.raises(EdgeVLMError, match="not a readable PyTorch checkpoint"):
        read_config(text)


def test_save_is_atomic_on_failure(model, tmp_path: Path, monkeypatch):
    target = tmp_path / "m.safetensors"
    save_checkpoint(model, target)
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("edgevlm.checkpoint.save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(model, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_fp16_storage_halves_size_and_loads_as_fp32(model, tmp_path: Path):
    a = save_checkpoint(model, tmp_path / "a.safetensors")
    b = save_checkpoint(model, tmp_path / "b.safetensors", dtype=torch.float16)
    assert b.stat().st_size < 0.6 * a.stat().st_size
    m = load_checkpoint(b).model
    assert m.decoder.embed_tokens.weight.dtype == torch.float32
    torch.testing.assert_close(_outputs(m), _outputs(model), rtol=1e-2, atol=1e-2)
