"""The training loop on a tiny model: loss goes down, checkpoints resume, the result loads and generates."""

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


def test_training_render_matches_the_native_path(monkeypatch):
    """Training renders on the model grid; evaluation and deployment preprocess a native series. The two
    must agree, partial volume included: a model trained on point-sampled volumes failed on native ones."""
    from edgevlm.data import sample_study
    from edgevlm.eval.runner import synthetic_studies
    from edgevlm.models import PRESETS
    from edgevlm.preprocess import preprocess
    from edgevlm.train import model_recipe, render_spec

    cfg = PRESETS["demo-tiny"]()
    study = next(synthetic_studies(1, seed=HELDOUT_SEED_START + 1))  # 5 mm native slices: a quick render
    native = preprocess(study.volume, model_recipe(cfg))
    spec = sample_study(HELDOUT_SEED_START + 1)
    error = float(np.abs(render_spec(spec, cfg) - native).mean())
    monkeypatch.setattr("edgevlm.train.SUPERSAMPLE_MAX", (1, 1))
    point_sampled = float(np.abs(render_spec(spec, cfg) - native).mean())
    assert error < 0.008 and error < 0.85 * point_sampled, (error, point_sampled)


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


def test_answer_weights_reproduce_the_training_loss_weighting():
    """Distillation weights positions as loss_on does: half reports (by sentence), half QAs (by answer)."""
    from edgevlm.train import answer_weights, sentence_mean

    gen = torch.Generator().manual_seed(0)
    ends = torch.zeros(16, dtype=torch.bool)
    ends[[3, 7]] = True
    report_targets = torch.randint(0, 16, (3, 12), generator=gen)
    report_targets[0, 9:] = -100
    report_targets[2, :4] = -100  # prompt positions
    qa_targets = torch.full((4, 6), -100)
    for row, n in enumerate((1, 2, 3, 5)):
        qa_targets[row, 6 - n:] = torch.randint(0, 16, (n,), generator=gen)
    report_loss = torch.rand(report_targets.shape, generator=gen, dtype=torch.float64)
    qa_loss = torch.rand(qa_targets.shape, generator=gen, dtype=torch.float64)

    def labels(targets):  # answer_weights reads labels[:, 1:], as answer_outputs does
        return torch.cat([torch.full((targets.shape[0], 1), -100), targets], 1)

    weights = answer_weights(labels(report_targets), labels(qa_targets), ends).double()
    flat = torch.cat([report_loss[report_targets != -100], qa_loss[qa_targets != -100]])
    per_answer = (qa_loss * (qa_targets != -100)).sum(1) / (qa_targets != -100).sum(1)
    expected = 0.5 * sentence_mean(report_loss, report_targets, ends) + 0.5 * per_answer.mean()
    assert weights.sum().item() == pytest.approx(1.0)
    assert (weights * flat).sum().item() == pytest.approx(expected.item(), rel=1e-6)  # float32 weights
    # Without a sentence table the report half is a plain token mean; with no QAs it takes all the mass.
    empty = labels(torch.full((0, 6), -100))
    weights = answer_weights(labels(report_targets), empty).double()
    assert (weights * report_loss[report_targets != -100]).sum().item() == pytest.approx(
        report_loss[report_targets != -100].mean().item(), rel=1e-6)  # float32 weights


def test_answer_weights_scale_report_positions_as_loss_on_scales_report_tokens(tiny_model_json):
    """Distillation's impression weighting: answer_weights with report_weights weighs answer positions as
    loss_on weighs the same model's report and QA tokens with report_weights (fresh random weights)."""
    from edgevlm.data import sample_study
    from edgevlm.models import MedVLM
    from edgevlm.models.tokenizer import special_ids, train_tokenizer
    from edgevlm.train import answer_outputs, answer_weights, loss_on, make_batch, sentence_end_table, study_texts

    torch.manual_seed(0)
    cfg = MedVLMConfig.from_json(tiny_model_json.read_text())
    rng = random.Random(0)
    texts = [study_texts(sample_study(s), rng, 2) for s in range(3)]
    corpus = [t for (_, r), qas in texts for t in (r, *(a for _, a in qas))] * 4
    tok = train_tokenizer(corpus, 300, [cfg.prompt.pad_token, "<s>", *cfg.prompt.eos_tokens, "<unk>",
                                        cfg.prompt.image_token])
    cfg.decoder.vocab_size = tok.get_vocab_size()
    model = MedVLM(cfg).double().eval()
    volumes = [torch.rand(cfg.vision.image_size) for _ in texts]
    vols, reports, qas, image_id = make_batch(volumes, texts, tok, cfg, special_ids(tok, cfg.prompt),
                                              torch.device("cpu"))
    vols = vols.double()
    report_weights = 1.0 + 4.0 * torch.rand(reports[1].shape, dtype=torch.float64)
    ends = sentence_end_table(tok)
    with torch.no_grad():
        expected = loss_on(model, vols, reports, qas, image_id, sentence_ends=ends, report_weights=report_weights)
        logits, _, targets = answer_outputs(model, model.encode_image(vols), reports, qas, image_id)
        per_position = F.cross_entropy(logits, targets, reduction="none")
    weights = answer_weights(reports[1], qas[1], ends, report_weights).double()
    assert torch.isfinite(expected) and (weights * per_position).sum().item() == pytest.approx(expected.item(),
                                                                                                 rel=1e-5)
    unweighted = answer_weights(reports[1], qas[1], ends).double()
    assert (weights * per_position).sum().item() != pytest.approx((unweighted * per_position).sum().item(), rel=1e-3)


def test_impression_weights_leave_a_report_without_the_structured_impression_alike():
    """A teacher-written report (distillation) may lack impression lines: its row keeps weight 1."""
    from edgevlm.data import sample_study
    from edgevlm.data.reports import report_text
    from edgevlm.models import PromptConfig
    from edgevlm.models.tokenizer import special_ids, train_tokenizer
    from edgevlm.train import impression_weights, sequence_batch

    good = report_text(sample_study(3), np.random.default_rng(3))
    broken = good.split("\nPleural effusion:")[0] + " The rest was not written."
    prompt = PromptConfig(max_new_tokens=8)
    tok = train_tokenizer([good, broken] * 3, 400, [prompt.pad_token, "<s>", *prompt.eos_tokens, "<unk>",
                                                   prompt.image_token])
    cfg = MedVLMConfig(decoder=DecoderConfig(vocab_size=tok.get_vocab_size(), max_seq_len=1024), prompt=prompt)
    _, labels = sequence_batch([("Write the report.", good), ("Write the report.", broken), ("Write it.", "")], tok,
                               cfg, special_ids(tok, prompt), torch.device("cpu"))
    weights = impression_weights([good, broken, ""], labels, tok, 3.0, 2.0)
    assert (weights[0] > 1).any() and (weights[1:] == 1).all()


def test_counterfactual_rows_leave_the_impression_answers_out_and_keep_the_findings_text():
    """A swapped report (`counterfactual_report`) is another training study's whole report, with the study's
    own QAs; in its row the impression answers weigh 0 and every other target token keeps its weight."""
    import random

    from edgevlm.data import sample_study
    from edgevlm.data.reports import impression_answers
    from edgevlm.models import PromptConfig
    from edgevlm.models.tokenizer import special_ids, train_tokenizer
    from edgevlm.train import counterfactual_report, impression_weights, sequence_batch, study_texts

    specs = [sample_study(s) for s in range(30)]
    rng = random.Random(0)
    own = study_texts(specs[0], rng, 3)
    swapped = counterfactual_report(own, specs, rng)
    assert swapped[1] == own[1] and swapped[0][0] == own[0][0] and swapped[0][1] != own[0][1]
    assert any(swapped[0][1].split("TECHNIQUE:")[0] == study_texts(spec, random.Random(1), 0)[0][1].split(
        "TECHNIQUE:")[0] for spec in specs)  # its impression is a training study's
    reports = [own[0][1], swapped[0][1]]
    prompt = PromptConfig(max_new_tokens=8)
    tok = train_tokenizer(reports * 3, 400, [prompt.pad_token, "<s>", *prompt.eos_tokens, "<unk>", prompt.image_token])
    cfg = MedVLMConfig(decoder=DecoderConfig(vocab_size=tok.get_vocab_size(), max_seq_len=1024), prompt=prompt)
    input_ids, labels = sequence_batch([own[0], swapped[0]], tok, cfg, special_ids(tok, prompt), torch.device("cpu"))
    plain = impression_weights(reports, labels, tok, 2.0, 3.0)
    weights = impression_weights(reports, labels, tok, 2.0, 3.0, counterfactual={1})
    assert torch.equal(weights[0], plain[0])
    zero = weights[1] == 0
    got = tok.decode(input_ids[1][zero].tolist()).replace(" ", "")
    assert got == "".join((" " + reports[1])[a:b] for a, b, _ in impression_answers(" " + reports[1])).replace(" ", "")
    assert (weights[1][~zero & (labels[1] != -100)] == 1).all()
    assert impression_weights(reports, labels, tok, 1.0, 1.0, counterfactual={0}) is not None


def test_counterfactual_rows_draw_nothing_when_off_and_swap_in_place_when_on():
    """Off, the text sequence of a run is what it was before the option existed (no draw from its rng)."""
    import random

    from edgevlm.data import sample_study
    from edgevlm.train import counterfactual_rows, study_texts

    specs = [sample_study(s) for s in range(12)]
    rng, twin = random.Random(5), random.Random(5)
    texts = [study_texts(spec, rng, 2) for spec in specs[:4]]
    [study_texts(spec, twin, 2) for spec in specs[:4]]
    before = list(texts)
    assert counterfactual_rows(texts, specs, 0.0, rng) == set() and texts == before
    assert rng.random() == twin.random()
    assert counterfactual_rows(texts, specs, 1.0, rng) == {0, 1, 2, 3}
    assert all(t[1] == b[1] and t[0][0] == b[0][0] for t, b in zip(texts, before, strict=True))  # QAs kept
    assert sum(t[0][1] != b[0][1] for t, b in zip(texts, before, strict=True)) >= 3


def test_impression_weights_mark_each_impression_answer_and_weigh_positives_more():
    """The weighted tokens spell exactly the impression answers (" none" or the finding's words), at the
    label positions `sequence_batch` gives them; positives get weight x positive weight, the rest 1."""
    from edgevlm.data import sample_study
    from edgevlm.data.reports import impression_answers, report_text
    from edgevlm.models import PromptConfig
    from edgevlm.models.tokenizer import special_ids, train_tokenizer
    from edgevlm.train import impression_weights, sequence_batch

    seeds = [s for s in range(40) if sample_study(s).findings][:3] + [s for s in range(40)
                                                                      if not sample_study(s).findings][:1]
    reports = [report_text(sample_study(s), np.random.default_rng(s)) for s in seeds]
    prompt = PromptConfig(max_new_tokens=8)
    tok = train_tokenizer(reports * 3, 400, [prompt.pad_token, "<s>", *prompt.eos_tokens, "<unk>", prompt.image_token])
    cfg = MedVLMConfig(decoder=DecoderConfig(vocab_size=tok.get_vocab_size(), max_seq_len=1024), prompt=prompt)
    questions = ["Write the report.", "Report, please, on this study."] * 2  # prompts of different lengths
    input_ids, labels = sequence_batch(list(zip(questions, reports, strict=True)), tok, cfg,
                                       special_ids(tok, prompt), torch.device("cpu"))
    assert impression_weights(reports, labels, tok, 1.0, 1.0) is None
    weights = impression_weights(reports, labels, tok, 3.0, 2.0)
    assert weights.shape == labels.shape and torch.isin(weights, torch.tensor([1.0, 3.0, 6.0])).all()
    assert (weights[labels == -100] == 1).all()  # prompt and padding untouched
    for row, report in enumerate(reports):
        answers = impression_answers(" " + report)
        for value, want in ((6.0, [a for a in answers if a[2]]), (3.0, [a for a in answers if not a[2]])):
            got = tok.decode(input_ids[row][weights[row] == value].tolist())
            assert got.replace(" ", "") == "".join((" " + report)[a:b] for a, b, _ in want).replace(" ", "")
    assert (weights == 6.0).any() and (weights == 3.0).any()


def test_finding_targets_name_the_side_and_lobe_of_each_type_separately():
    from edgevlm.data import sample_study
    from edgevlm.train import finding_labels, finding_targets

    labels = finding_labels()
    seen = 0
    for seed in range(200):
        spec = sample_study(seed)
        on = {labels[i] for i in finding_targets(spec).nonzero().flatten().tolist()}
        expected = set()
        for f in spec.findings:
            expected.add(f.type)
            if f.type in ("nodule", "mass", "consolidation"):
                expected.add(f"{f.type}:{f.lobe}")
            if f.type in ("pleural_effusion", "pneumothorax"):
                expected |= {f"{f.type}:{s}" for s in ("left", "right") if f.side in (s, "bilateral")}
        assert on == expected, (seed, on, expected)
        seen += any(":" in label for label in on)
    assert seen >= 20


def test_decoder_probe_adds_its_loss_at_the_answer_positions_and_reaches_the_image(tiny_model_json):
    """loss_on's decoder probe: weight x the mean over reports and QAs of a BCE at every position that
    predicts an answer token, recomputed here by hand; its gradient reaches the projector (through the
    decoder's attention over the visual tokens)."""
    import torch.nn.functional as F

    from edgevlm.models import MedVLM
    from edgevlm.train import DecoderProbe, loss_on

    cfg = MedVLMConfig.from_json(tiny_model_json.read_text())
    torch.manual_seed(0)
    model, head = MedVLM(cfg).double(), DecoderProbe(cfg.decoder.dim, 5).double()
    image, m = 9, cfg.num_visual_tokens
    gen = torch.Generator().manual_seed(1)

    def sequences(rows, width, prompt):
        ids = torch.randint(10, cfg.decoder.vocab_size, (rows, width), generator=gen)
        ids[:, :m] = image
        labels = ids.clone()
        labels[:, :prompt] = -100
        labels[0, -3:] = -100  # right padding
        return ids, labels

    volumes = torch.rand(2, 1, *cfg.vision.image_size, generator=gen, dtype=torch.float64)
    reports, (qa_ids, qa_labels) = sequences(2, m + 14, m + 4), sequences(3, m + 7, m + 5)
    owner = torch.tensor([1, 0, 1])
    targets = torch.randint(0, 2, (2, 5), generator=gen).double()
    base = loss_on(model, volumes, reports, (qa_ids, qa_labels, owner), image)
    with_probe = loss_on(model, volumes, reports, (qa_ids, qa_labels, owner), image, decoder_probe=(head, targets, 0.7))

    visual = model.encode_image(volumes)
    expected = []
    for (ids, labels), vis, rows in ((reports, visual, targets), ((qa_ids, qa_labels), visual[owner], targets[owner])):
        _, hidden = model.decoder(model.embed(ids, vis, image), return_hidden=True)
        answer = labels[:, 1:] != -100
        logits = head(hidden[:, :-1])[answer]
        per_position = rows[:, None].expand(-1, answer.shape[1], -1)[answer]
        expected.append(F.binary_cross_entropy_with_logits(logits, per_position))
    probe = with_probe - base
    assert probe.item() == pytest.approx(0.7 * torch.stack(expected).mean().item(), rel=1e-6)  # float32 logits
    (grad,) = torch.autograd.grad(probe, model.projector.linear2.weight)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_text_rope_positions_move_only_the_text_after_the_image(tiny_model_json):
    """QA position jitter: known positions, a pure relative shift for text, and a real effect on the model."""
    from edgevlm.models import MedVLM
    from edgevlm.train import text_rope_positions

    image = 9
    ids = torch.tensor([[1, 9, 9, 9, 5, 6, 7, 0], [1, 9, 9, 9, 5, 6, 0, 0]])
    pos = text_rope_positions(ids, image, torch.tensor([10, 0]))
    assert pos.tolist() == [[0, 1, 2, 3, 14, 15, 16, 17], [0, 1, 2, 3, 4, 5, 6, 7]]

    cfg = MedVLMConfig.from_json(tiny_model_json.read_text())
    torch.manual_seed(0)
    decoder = MedVLM(cfg).double().decoder
    embeds = torch.randn(1, 12, cfg.decoder.dim, dtype=torch.float64)
    with torch.no_grad():
        plain = decoder(embeds)
        # no image token: every position moves by the same amount, and RoPE only sees differences
        text_only = text_rope_positions(torch.full((1, 12), 5), image, torch.tensor([37]))
        assert torch.allclose(decoder(embeds, rope_pos=text_only), plain, atol=1e-9)
        # with image tokens the text moves away from them: the outputs after the image change
        with_image = text_rope_positions(torch.tensor([[1, 9, 9, 9, *[5] * 8]]), image, torch.tensor([37]))
        moved = decoder(embeds, rope_pos=with_image)
    assert torch.allclose(moved[:, :4], plain[:, :4], atol=1e-12)
    assert (moved[:, 4:] - plain[:, 4:]).abs().max() > 1e-6  # float64 noise is ~1e-15


def test_lesion_targets_mark_the_patches_a_focal_finding_occupies():
    """Per-patch lesion targets at the demo grid: rendered with and without each focal finding type."""
    from edgevlm.data import sample_study
    from edgevlm.models import PRESETS
    from edgevlm.train import LESION_TYPES, lesion_patch_targets, render_spec

    cfg = PRESETS["demo-tiny"]()
    by_case = {}
    for seed in range(HELDOUT_SEED_START, HELDOUT_SEED_START + 200):
        spec = sample_study(seed)
        types = {f.type for f in spec.findings}
        if not spec.findings and "normal" not in by_case:
            by_case["normal"] = spec
        if types & set(LESION_TYPES) == {"mass"} and "mass" not in by_case:
            by_case["mass"] = spec
        if len(by_case) == 2:
            break
    assert len(by_case) == 2
    normal = by_case["normal"]
    volume = render_spec(normal, cfg)
    assert np.array_equal(volume, render_spec(normal, cfg))  # the method relies on a deterministic render
    assert lesion_patch_targets(normal, volume, cfg).sum() == 0

    spec = by_case["mass"]
    targets = lesion_patch_targets(spec, render_spec(spec, cfg).astype(np.float16), cfg)
    assert targets.shape == (cfg.vision.num_patches, len(LESION_TYPES))
    mass = targets[:, LESION_TYPES.index("mass")]
    # a mass of >= 3 cm spans a few 40 x 45 x 45 mm patches, never most of the chest
    assert 1 <= mass.sum() <= 40, mass.sum()
    assert targets.sum() == mass.sum()  # no other focal type is present


def test_cell_targets_follow_the_spp_pooling_grid():
    """A lesion in patch (d, h, w) marks visual token (d//pd, h//ph, w//pw) in raster order, as the spp
    projector pools (avg_pool3d over the patch grid, flattened d', h', w')."""
    from edgevlm.train import cell_targets

    grid, pool = (4, 6, 8), (2, 3, 2)
    cells_grid = (2, 2, 4)
    rng = np.random.default_rng(0)
    for _ in range(20):
        d, h, w = (int(rng.integers(g)) for g in grid)
        t = int(rng.integers(3))
        patches = torch.zeros(1, grid[0] * grid[1] * grid[2], 3)
        patches[0, (d * grid[1] + h) * grid[2] + w, t] = 1.0
        cells = cell_targets(patches, grid, pool)
        assert cells.shape == (1, 16, 3) and cells.sum() == 1
        cd, ch, cw = d // pool[0], h // pool[1], w // pool[2]
        assert cells[0, (cd * cells_grid[1] + ch) * cells_grid[2] + cw, t] == 1


# fp32 also covers the text stage reading the fp16 token cache; the probe also covers resuming its state.
@pytest.mark.parametrize("autocast,probe_weight", [("bf16", 0.0), ("fp32", 1.0)])
def test_staged_recipe_trains_the_encoder_alone_then_freezes_it(tmp_path, tiny_model_json, autocast, probe_weight):
    # Vision stage: every step sees all 6 training studies, so its loss must fall on the same data.
    cfg = TrainConfig(model=str(tiny_model_json), steps=10, vision_steps=5, vision_batch_studies=6, vision_lr=3e-3,
                      batch_studies=4, qa_per_study=2, lr=3e-3, warmup_steps=1, n_train_studies=6, vocab_size=300,
                      tokenizer_corpus_studies=40, eval_every=5, eval_studies=2, checkpoint_every=5, threads=2,
                      autocast=autocast, decoder_probe_weight=probe_weight)
    out = tmp_path / "run"
    train(TrainConfig(**{**cfg.__dict__, "steps": 5}), out, log=lambda _: None)
    after_vision = torch.load(out / "last.pt", weights_only=True)["model"]
    train(cfg, out, log=lambda _: None)  # resumes at the stage boundary: the text stage
    final = torch.load(out / "last.pt", weights_only=True)["model"]
    history = json.loads((out / "history.json").read_text())
    stages = [h.get("stage") for h in history]
    assert stages == ["vision"] * 5 + [None] * 5
    assert history[4]["loss"] < history[0]["loss"], history[:5]
    assert set(history[4]["heldout_finding_auc"]) and "heldout_lesion_patch_auc" in history[4]
    text = [h["loss"] for h in history[5:]]
    assert text[-1] < text[0] - 0.3, text
    assert ("heldout_decoder_probe_auc" in history[-1]) == (probe_weight > 0)
    vision_keys = [k for k in final if k.startswith("vision.")]
    decoder_keys = [k for k in final if k.startswith("decoder.")]
    assert vision_keys and decoder_keys
    assert all(torch.equal(final[k], after_vision[k]) for k in vision_keys)  # frozen in the text stage
    assert all(not torch.equal(final[k], after_vision[k]) for k in decoder_keys if k.endswith("weight"))


def test_the_vision_stage_leaves_the_decoder_untouched(tmp_path, tiny_model_json):
    cfg = TrainConfig(model=str(tiny_model_json), steps=3, vision_steps=3, vision_batch_studies=4, warmup_steps=1,
                      n_train_studies=4, vocab_size=300, tokenizer_corpus_studies=40, eval_every=3, eval_studies=2,
                      checkpoint_every=3, threads=2)
    a = train(TrainConfig(**{**cfg.__dict__, "steps": 1, "vision_steps": 1}), tmp_path / "a", log=lambda _: None)
    b = train(cfg, tmp_path / "b", log=lambda _: None)
    first, third = load_checkpoint(a).model.state_dict(), load_checkpoint(b).model.state_dict()
    # Same seed, same init: the decoder gets no gradient (nor weight decay) while the encoder learns.
    assert all(torch.equal(first[k], third[k]) for k in first if k.startswith("decoder."))
    assert any(not torch.equal(first[k], third[k]) for k in first if k.startswith("vision.blocks"))


def test_a_bad_autocast_value_is_refused_before_anything_is_written(tmp_path):
    from typer.testing import CliRunner

    from edgevlm.cli import app

    result = CliRunner().invoke(app, ["train", "-o", str(tmp_path / "run"), "--autocast", "fp8"])
    assert result.exit_code == 2 and "--autocast" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="autocast"):
        train(TrainConfig(autocast="fp8"), tmp_path / "lib", log=lambda _: None)
    assert not (tmp_path / "lib").exists()


def test_init_continues_a_trained_checkpoint_with_its_encoder_frozen(tmp_path, tiny_model_json):
    from edgevlm.checkpoint import file_sha256

    base = TrainConfig(model=str(tiny_model_json), steps=4, batch_studies=4, qa_per_study=2, lr=3e-3, warmup_steps=1,
                       n_train_studies=6, vocab_size=300, tokenizer_corpus_studies=40, eval_every=4, eval_studies=2,
                       checkpoint_every=4, threads=2)
    trained = train(base, tmp_path / "base", log=lambda _: None)
    cfg = TrainConfig(**{**base.__dict__, "model": "demo-tiny", "steps": 6, "init": str(trained),
                         "impression_weight": 2.0, "positive_impression_weight": 3.0})
    path = train(cfg, tmp_path / "ft", log=lambda _: None)
    before, after = load_checkpoint(trained), load_checkpoint(path)
    # The checkpoint's own config and tokenizer, not the preset's, and its trained weights as the start:
    # the encoder (position table included: no second centering) is exactly the init's.
    assert after.config.to_json() == before.config.to_json()
    assert after.tokenizer_json == before.tokenizer_json
    old, new = before.model.state_dict(), after.model.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith("vision."))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder.layers"))
    assert after.extra["init"] == {"source": trained.name, "sha256": file_sha256(trained)}
    history = json.loads((tmp_path / "ft" / "history.json").read_text())
    assert [h.get("stage") for h in history] == [None] * 6 and all(np.isfinite(h["loss"]) for h in history)


def test_init_refuses_a_checkpoint_without_a_tokenizer(tmp_path):
    from edgevlm.checkpoint import save_checkpoint
    from edgevlm.errors import EdgeVLMError
    from edgevlm.models import PRESETS, MedVLM

    torch.manual_seed(0)
    cfg = PRESETS["demo-tiny"]()
    bare = save_checkpoint(MedVLM(cfg), tmp_path / "bare.safetensors", None, {})
    with pytest.raises(EdgeVLMError, match=r"bare\.safetensors: --init needs a checkpoint that carries its tokenizer"):
        train(TrainConfig(init=str(bare)), tmp_path / "run", log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_finding_auc_is_the_mann_whitney_statistic_with_ties_counted_half():
    """Against scipy's Mann-Whitney U on fresh random integer scores (many ties), and the two cases that
    pin tie handling: all scores equal is 0.5 whatever the labels' order, a perfect split is 1."""
    from scipy.stats import mannwhitneyu

    from edgevlm.train import finding_auc

    rng = np.random.default_rng()
    scores = rng.integers(0, 4, (60, 3)).astype(np.float64)
    truth = rng.integers(0, 2, (60, 3))
    truth[:2] = [[0, 0, 0], [1, 1, 1]]  # both classes in every column
    got = finding_auc(torch.from_numpy(scores), torch.from_numpy(truth).float(), ("a", "b", "c"))
    for j, label in enumerate("abc"):
        y = truth[:, j] == 1
        u = mannwhitneyu(scores[y, j], scores[~y, j]).statistic
        assert got[label] == round(float(u / (y.sum() * (~y).sum())), 3)
    flat = finding_auc(torch.zeros(6, 1), torch.tensor([[1.0], [1.0], [0.0], [0.0], [0.0], [1.0]]), ("x",))
    assert flat == {"x": 0.5}
    split = finding_auc(torch.tensor([[0.1], [0.1], [0.9], [0.9]]), torch.tensor([[0.0], [0.0], [1.0], [1.0]]), ("x",))
    assert split == {"x": 1.0}
