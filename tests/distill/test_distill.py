"""Distillation on tiny models: KD loss goes down, the student loads and generates, init copies by value,
unlabeled folders are labeled by the teacher, and the config round-trips through JSON."""

import json
from dataclasses import asdict

import pytest
import torch

from edgevlm.checkpoint import load_checkpoint
from edgevlm.distill import DistillConfig, distill, init_from_teacher, layer_map, teacher_key
from edgevlm.errors import EdgeVLMError
from edgevlm.eval.runner import model_predictor
from edgevlm.models import PRESETS, DecoderConfig, MedVLM, MedVLMConfig, ProjectorConfig, PromptConfig, VisionConfig
from edgevlm.train import HELDOUT_SEED_START, TrainConfig, render_study, train

TINY_RECIPE = {"name": "tiny-chest", "window": [-1000.0, 600.0], "spacing_mm": [40.0, 11.2, 11.2],
               "grid": [8, 32, 32]}


def tiny_config(name: str, vision_depth: int, decoder_dim: int, decoder_layers: int, pool=(1, 2, 2),
                attention: str = "dense") -> MedVLMConfig:
    return MedVLMConfig(
        name=name,
        vision=VisionConfig(image_size=(8, 32, 32), patch_size=(4, 8, 8), dim=32, depth=vision_depth, heads=2,
                            mlp_dim=64, attention=attention, sparse_radius=1, sparse_block=8,
                            foreground_threshold=0.05 if attention == "sparse3d" else None),
        projector=ProjectorConfig(kind="spp", pool=pool),
        decoder=DecoderConfig(vocab_size=300, dim=decoder_dim, n_layers=decoder_layers, n_heads=2,
                              intermediate_size=2 * decoder_dim, max_seq_len=640, tie_embeddings=True),
        prompt=PromptConfig(max_new_tokens=8),
        preprocess=dict(TINY_RECIPE),
    )


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    """A 2-layer teacher trained for a few steps (its logits are not uniform, so KL is informative)."""
    folder = tmp_path_factory.mktemp("teacher")
    (folder / "teacher.json").write_text(tiny_config("tiny-teacher", 2, 48, 2).to_json())
    cfg = TrainConfig(model=str(folder / "teacher.json"), steps=10, batch_studies=4, qa_per_study=2, lr=3e-3,
                      warmup_steps=2, n_train_studies=6, vocab_size=300, tokenizer_corpus_studies=40,
                      eval_every=100, eval_studies=1, checkpoint_every=100, render_workers=1, threads=2)
    return train(cfg, folder / "run", log=lambda _: None)


@pytest.fixture
def student_json(tmp_path):
    """Narrower decoder (a learned hidden-state projection), one sparse3d ViT layer, fewer visual tokens."""
    path = tmp_path / "student.json"
    path.write_text(tiny_config("tiny-student", 1, 32, 1, pool=(2, 2, 2), attention="sparse3d").to_json())
    return path


def test_distill_lowers_kd_loss_resumes_and_writes_a_student_that_loads_and_generates(tmp_path, teacher_path,
                                                                                      student_json):
    cfg = DistillConfig(teacher=str(teacher_path), student=str(student_json), data="synthetic:6", steps=16,
                        batch_studies=4, qa_per_study=2, lr=3e-3, warmup_steps=2, heldout_studies=2, eval_every=4,
                        checkpoint_every=8, render_workers=1, threads=2)
    out = tmp_path / "run"
    distill(DistillConfig(**{**asdict(cfg), "steps": 8}), out, log=lambda _: None)
    assert (out / "last.pt").exists()
    path = distill(cfg, out, log=lambda _: None)  # resumes at step 8

    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 17))
    assert {"kl", "ce", "vision", "hidden", "total"} <= set(history[0])
    heldout_kl = [h["heldout"]["kl"] for h in history if "heldout" in h]
    assert heldout_kl[-1] < heldout_kl[0], heldout_kl
    train_kl = [h["kl"] for h in history]
    assert sum(train_kl[-4:]) < sum(train_kl[:4]), train_kl

    ckpt = load_checkpoint(path)
    assert ckpt.config.name == "tiny-student" and ckpt.config.vision.attention == "sparse3d"
    assert ckpt.config.num_visual_tokens == 4
    saved = DistillConfig(**ckpt.extra["distillation"]["config"])
    assert saved == cfg
    assert "vision.patch_embed.weight" in ckpt.extra["distillation"]["init"]["copied"]
    volume, _ = render_study(HELDOUT_SEED_START, ckpt.config)
    answers = model_predictor(ckpt.model, ckpt.tokenizer_json, max_new_tokens=5)(volume, ["Is there emphysema?"])
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_init_from_teacher_copies_matching_tensors_by_value(teacher_path):
    teacher = load_checkpoint(teacher_path).model
    assert layer_map(1, 2) == [1] and layer_map(2, 4) == [0, 3] and layer_map(3, 3) == [0, 1, 2]

    # Same widths: ViT block 0 <- teacher block 1, decoder layer 0 <- teacher layer 1, embeddings, projector.
    cfg = tiny_config("same-width", 1, 48, 1, pool=(2, 2, 2), attention="sparse3d")
    cfg.decoder.vocab_size = teacher.cfg.decoder.vocab_size
    student = MedVLM(cfg)
    report = init_from_teacher(student, teacher)
    assert torch.equal(student.vision.blocks[0].attn.qkv.weight, teacher.vision.blocks[1].attn.qkv.weight)
    assert torch.equal(student.vision.pos_embed, teacher.vision.pos_embed)
    assert torch.equal(student.decoder.layers[0].mlp.down_proj.weight, teacher.decoder.layers[1].mlp.down_proj.weight)
    assert torch.equal(student.decoder.embed_tokens.weight, teacher.decoder.embed_tokens.weight)
    assert torch.equal(student.decoder.lm_head.weight, teacher.decoder.lm_head.weight)  # tied
    assert torch.equal(student.projector.linear1.weight, teacher.projector.linear1.weight)
    assert report["copied"]["vision.blocks.0.attn.qkv.weight"] == "vision.blocks.1.attn.qkv.weight"
    assert not report["skipped"] and report["copied_fraction"] == 1.0

    # Narrower decoder: the ViT still copies; decoder and projector output stay fresh and are listed.
    narrow = tiny_config("narrow", 1, 32, 1, pool=(2, 2, 2))
    narrow.decoder.vocab_size = teacher.cfg.decoder.vocab_size
    student = MedVLM(narrow)
    fresh_embed = student.decoder.embed_tokens.weight.clone()
    report = init_from_teacher(student, teacher)
    assert torch.equal(student.vision.blocks[0].mlp.linear1.weight, teacher.vision.blocks[1].mlp.linear1.weight)
    assert torch.equal(student.decoder.embed_tokens.weight, fresh_embed)
    assert "decoder.embed_tokens.weight" in report["skipped"] and "projector.linear2.weight" in report["skipped"]


def test_unlabeled_folder_is_labeled_by_the_teacher(tmp_path, teacher_path, student_json):
    from edgevlm.data.dicom import make_synthetic

    studies = tmp_path / "studies"
    make_synthetic(studies, 2, seed=HELDOUT_SEED_START + 500)
    cfg = DistillConfig(teacher=str(teacher_path), student=str(student_json), data=str(studies), steps=2,
                        batch_studies=2, qa_per_study=2, heldout_studies=0, eval_every=100, checkpoint_every=100,
                        threads=2)
    path = distill(cfg, tmp_path / "run", log=lambda _: None)
    labels = json.loads((tmp_path / "run" / "teacher_labels.json").read_text())
    assert len(labels) == 2
    for entry in labels.values():
        assert isinstance(entry["report"], str)
        assert len(entry["qa"]) >= 16 and all(len(pair) == 2 for pair in entry["qa"])  # every presence question
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert "seq" in history[0] and "ce" not in history[0]  # teacher text is the target, no ground truth read
    assert load_checkpoint(path).config.name == "tiny-student"


def test_config_json_round_trip_and_errors(tmp_path, teacher_path):
    cfg = DistillConfig(teacher="t.safetensors", student="demo-small", data="synthetic:10", temperature=3.0,
                        w_hidden=0.0, threads=2, extra={"note": "x"})
    assert DistillConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown DistillConfig fields"):
        DistillConfig.from_json(json.dumps({"temprature": 2.0}))

    bad_vocab = tmp_path / "bad.json"
    wrong = tiny_config("bad", 1, 32, 1)
    wrong.decoder.vocab_size = 999
    bad_vocab.write_text(wrong.to_json())
    with pytest.raises(EdgeVLMError, match="vocab_size 999"):
        distill(DistillConfig(teacher=str(teacher_path), student=str(bad_vocab), data="synthetic:2"), tmp_path / "r",
                log=lambda _: None)


def test_demo_small_preset_is_small_and_starts_whole_from_the_teacher():
    cfg = PRESETS["demo-small"]()
    teacher = PRESETS["demo-tiny"]()
    assert cfg.vision.attention == "sparse3d" and cfg.vision.image_size == teacher.vision.image_size
    assert cfg.vision.depth < teacher.vision.depth and cfg.decoder.n_layers < teacher.decoder.n_layers
    with torch.device("meta"):
        student = MedVLM(cfg)
        n_params = sum(p.numel() for p in student.parameters())
        teacher_model = MedVLM(teacher)
    assert n_params * 2 <= 10e6  # fp16 bytes
    # Every student tensor has a same-shaped teacher tensor under the layer map, so nothing starts fresh.
    vision_map = layer_map(cfg.vision.depth, teacher.vision.depth)
    decoder_map = layer_map(cfg.decoder.n_layers, teacher.decoder.n_layers)
    source = teacher_model.state_dict()
    for name, tensor in student.state_dict().items():
        key = teacher_key(name, vision_map, decoder_map)
        assert key in source and source[key].shape == tensor.shape, name


def test_init_starts_the_student_from_a_trained_checkpoint(tmp_path, teacher_path, student_json):
    # A first student, then a second run that starts from it instead of the teacher (lr 0: one step leaves the
    # weights at their initial values, so the saved student must equal the checkpoint it started from).
    common = dict(teacher=str(teacher_path), student=str(student_json), data="synthetic:4", batch_studies=2,
                  qa_per_study=1, heldout_studies=0, eval_every=100, checkpoint_every=100, render_workers=1,
                  threads=2)
    first = load_checkpoint(distill(DistillConfig(**common, steps=3, lr=3e-3, warmup_steps=1), tmp_path / "a",
                                    log=lambda _: None))
    second_path = distill(DistillConfig(**common, steps=1, lr=0.0, warmup_steps=0, weight_decay=0.0,
                                        init=str(tmp_path / "a" / "model.safetensors")), tmp_path / "b",
                          log=lambda _: None)
    second = load_checkpoint(second_path)
    init = second.extra["distillation"]["init"]
    assert init["source"] == "model.safetensors" and init["copied_fraction"] == 1.0
    teacher = load_checkpoint(teacher_path).model.state_dict()
    moved = 0
    for name, tensor in second.model.state_dict().items():
        torch.testing.assert_close(tensor, first.model.state_dict()[name], rtol=0, atol=0)
        assert name in init["copied"]
        moved += name in teacher and teacher[name].shape == tensor.shape and not torch.equal(teacher[name], tensor)
    assert moved > 0  # it started from the trained student, not from the teacher


def test_impression_weights_reach_the_distillation_losses(tmp_path, teacher_path, student_json):
    """Same seed and batch: weighting the impression answers changes the first step's kl and ce (and only
    through them: the feature-matching terms stay equal), and the weights are recorded with the run."""
    base = DistillConfig(teacher=str(teacher_path), student=str(student_json), data="synthetic:6", steps=1,
                         batch_studies=4, qa_per_study=2, warmup_steps=1, heldout_studies=0, eval_every=100,
                         checkpoint_every=100, render_workers=1, threads=2)
    plain = distill(base, tmp_path / "plain", log=lambda _: None)
    weighted_cfg = DistillConfig(**{**asdict(base), "impression_weight": 3.0, "positive_impression_weight": 2.0})
    weighted = distill(weighted_cfg, tmp_path / "weighted", log=lambda _: None)
    a = json.loads((tmp_path / "plain" / "history.json").read_text())[0]
    b = json.loads((tmp_path / "weighted" / "history.json").read_text())[0]
    assert b["kl"] != pytest.approx(a["kl"], rel=1e-3) and b["ce"] != pytest.approx(a["ce"], rel=1e-3)
    assert b["vision"] == pytest.approx(a["vision"]) and b["hidden"] == pytest.approx(a["hidden"])
    saved = load_checkpoint(weighted).extra["distillation"]["config"]
    assert (saved["impression_weight"], saved["positive_impression_weight"]) == (3.0, 2.0)
    assert load_checkpoint(plain).extra["distillation"]["config"]["impression_weight"] == 1.0


def test_answer_rows_name_the_study_of_each_answer_position():
    from edgevlm.distill import answer_rows

    report_labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 10]])  # row 0: 2 answers, row 1: 4
    qa_labels = torch.tensor([[-100, 3, 4], [-100, -100, 2], [-100, 1, 1]])
    owner = torch.tensor([1, 0, 1])
    # position t predicts token t + 1, so a row's answers are its labels[:, 1:] != -100, in row order
    assert answer_rows(report_labels, qa_labels, owner).tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1]
    assert answer_rows(report_labels, qa_labels[:0], owner[:0]).tolist() == [0, 0, 1, 1, 1, 1]


def test_probe_targets_come_from_the_ground_truth_or_the_teachers_report():
    from edgevlm.data import sample_study
    from edgevlm.distill import TrainStudy, probe_targets
    from edgevlm.train import finding_labels, finding_targets

    spec = sample_study(3)
    labeled = TrainStudy("a", torch.zeros(1), None, spec=spec)
    assert torch.equal(probe_targets(labeled), finding_targets(spec))
    report = ("IMPRESSION:\nSmall left pleural effusion.\nNo pneumothorax.\n\n"
              "FINDINGS:\nThere is a small left pleural effusion. No pneumothorax. The heart is not enlarged.")
    unlabeled = TrainStudy("b", torch.zeros(1), None, labels={"report": report, "qa": []})
    names = [n for n, v in zip(finding_labels(), probe_targets(unlabeled).tolist(), strict=True) if v]
    assert names == ["pleural_effusion", "pleural_effusion:left"]


def test_probes_train_resume_and_refuse_a_changed_weight(tmp_path, teacher_path, student_json):
    """Both probe terms are logged (held-out too) and go down, enter the total with their weights, and a resume
    with the probes switched off is refused (the optimizer state holds the probes' parameters)."""
    cfg = DistillConfig(teacher=str(teacher_path), student=str(student_json), data="synthetic:6", steps=16,
                        batch_studies=4, qa_per_study=2, lr=3e-3, warmup_steps=2, heldout_studies=2, eval_every=8,
                        checkpoint_every=8, render_workers=1, threads=2, decoder_probe_weight=2.0,
                        pooled_probe_weight=0.5)
    out = tmp_path / "run"
    distill(DistillConfig(**{**asdict(cfg), "steps": 8}), out, log=lambda _: None)
    distill(cfg, out, log=lambda _: None)
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 17))
    for term in ("probe", "pooled_probe"):
        values = [h[term] for h in history]
        assert all(v == v and v > 0 for v in values)  # NaN never passes
        assert sum(values[-4:]) < sum(values[:4]), (term, values)
        assert term in history[-1]["heldout"]
    first = history[0]
    terms = first["kl"] + 0.5 * first["ce"] + first["vision"] + 0.5 * first["hidden"]  # cfg's default weights
    assert first["total"] == pytest.approx(terms + 2.0 * first["probe"] + 0.5 * first["pooled_probe"], abs=2e-3)

    off = DistillConfig(**{**asdict(cfg), "steps": 20, "decoder_probe_weight": 0.0, "pooled_probe_weight": 0.0})
    with pytest.raises(EdgeVLMError, match="decoder-probe-weight"):
        distill(off, out, log=lambda _: None)
