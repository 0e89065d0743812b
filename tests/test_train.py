"""The training loop on a tiny model: loss goes down, checkpoints resume, the result loads and generates."""

import json

import pytest
import torch

from edgevlm.checkpoint import load_checkpoint
from edgevlm.models import DecoderConfig, MedVLMConfig, ProjectorConfig, PromptConfig, VisionConfig
from edgevlm.train import HELDOUT_SEED_START, TrainConfig, render_study, train


@pytest.fixture
def tiny_model_json(tmp_path):
    cfg = MedVLMConfig(
        name="train-test",
        vision=VisionConfig(image_size=(8, 32, 32), patch_size=(4, 8, 8), dim=32, depth=1, heads=2, mlp_dim=64),
        projector=ProjectorConfig(kind="spp", pool=(1, 2, 2)),
        decoder=DecoderConfig(vocab_size=300, dim=48, n_layers=1, n_heads=2, intermediate_size=96, max_seq_len=640,
                              tie_embeddings=True),
        prompt=PromptConfig(max_new_tokens=8),
        preprocess={"name": "tiny-chest", "window": [-1000.0, 600.0], "spacing_mm": [40.0, 11.2, 11.2],
                    "grid": [8, 32, 32]},
    )
    path = tmp_path / "tiny.json"
    path.write_text(cfg.to_json())
    return path


def test_training_lowers_loss_resumes_and_writes_a_loadable_checkpoint(tmp_path, tiny_model_json):
    cfg = TrainConfig(model=str(tiny_model_json), steps=12, batch_studies=4, qa_per_study=2, lr=3e-3,
                      warmup_steps=2, n_train_studies=6, vocab_size=300, tokenizer_corpus_studies=40,
                      eval_every=6, eval_studies=2, checkpoint_every=6, threads=2)
    out = tmp_path / "run"
    half = TrainConfig(**{**cfg.__dict__, "steps": 6})
    train(half, out, log=lambda _: None)
    assert (out / "last.pt").exists()
    path = train(cfg, out, log=lambda _: None)  # resumes at step 6
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 13))
    first, last = history[0]["loss"], history[-1]["loss"]
    assert last < first - 0.5, (first, last)
    assert history[-1]["heldout_loss"] < history[5]["heldout_loss"] + 1e-6 or history[-1]["heldout_loss"] < first

    ckpt = load_checkpoint(path)
    assert ckpt.tokenizer_json and ckpt.extra["training"]["config"]["steps"] == 12
    from edgevlm.eval.runner import model_predictor

    volume, _ = render_study(HELDOUT_SEED_START, ckpt.config)
    answers = model_predictor(ckpt.model, ckpt.tokenizer_json, max_new_tokens=5)(volume, ["Is there emphysema?"])
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_rendered_training_volume_matches_the_recipe_grid():
    from edgevlm.models import PRESETS

    cfg = PRESETS["demo-tiny"]()
    volume, spec = render_study(7, cfg)
    assert volume.shape == (32, 128, 128) and volume.dtype.name == "float32"
    assert volume.min() >= 0.0 and volume.max() <= 1.0 and torch.isfinite(torch.from_numpy(volume)).all()
    assert spec.seed == 7
