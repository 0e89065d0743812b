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


def test_input_centering_folds_exactly_into_the_position_table(tiny_model_json):
    """Training-time centering (pos_embed - W mu) must bake into a plain ViT with the same outputs."""
    from edgevlm.models import MedVLM
    from edgevlm.train import bake_parametrizations, prepare_for_training

    cfg = MedVLMConfig.from_json(tiny_model_json.read_text())
    torch.manual_seed(0)
    model = MedVLM(cfg).double()
    mean_volume = torch.rand(cfg.vision.image_size, dtype=torch.float64)
    prepare_for_training(model, mean_volume)
    for block in model.vision.blocks:  # zero-initialized residual outputs
        assert block.attn.out_proj.weight.abs().max() == 0 and block.mlp.linear2.weight.abs().max() == 0
        torch.nn.init.normal_(block.attn.out_proj.weight, std=0.1)  # so the blocks take part below
        torch.nn.init.normal_(block.mlp.linear2.weight, std=0.1)
    volume = torch.rand(2, 1, *cfg.vision.image_size, dtype=torch.float64)
    with torch.no_grad():
        reference_tokens = model.vision(volume).clone()
        raw_pos = model.vision.parametrizations.pos_embed.original.clone()
    bake_parametrizations(model)
    assert "pos_embed" in dict(model.vision.named_parameters())  # a plain parameter again
    with torch.no_grad():
        baked = model.vision(volume)
        model.vision.pos_embed.copy_(raw_pos)  # undo the fold and centre the input instead
        explicit = model.vision(volume - mean_volume)
    assert torch.allclose(baked, reference_tokens, atol=1e-12)
    assert torch.allclose(baked, explicit, atol=1e-10)
    assert not torch.allclose(baked, model.vision(volume), atol=1e-3)  # centering matters


def test_sentence_mean_weights_each_sentence_equally():
    from edgevlm.train import sentence_mean

    ends = torch.tensor([False, False, True, False])  # token 2 closes a sentence
    # row 0: sentence (0, 0, 2) losses 1, 2, 3 -> 2; sentence (1, 3) losses 10, 20 -> 15; pad ignored
    targets = torch.tensor([[0, 0, 2, 1, 3, -100], [1, 2, -100, -100, -100, -100]])
    losses = torch.tensor([[1.0, 2.0, 3.0, 10.0, 20.0, 99.0], [4.0, 6.0, 99.0, 99.0, 99.0, 99.0]])
    assert sentence_mean(losses, targets, ends).item() == pytest.approx((2.0 + 15.0 + 5.0) / 3)
