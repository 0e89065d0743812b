import pytest
import torch

from edgevlm.models import GenerationConfig, MedVLM, sample


def _prompts(cfg, lengths, image_id=3, vocab=97):
    rows = []
    for n in lengths:
        text = torch.randint(5, vocab, (n,)).tolist()
        rows.append([1] + [image_id] * cfg.num_visual_tokens + text)
    return rows


def test_visual_tokens_are_spliced_at_placeholders(tiny_cfg):
    model = MedVLM(tiny_cfg).eval()
    volume = torch.randn(1, 1, 8, 16, 16)
    ids = torch.tensor(_prompts(tiny_cfg, [4]))
    visual = model.encode_image(volume)
    assert visual.shape == (1, 8, 48)
    embeds = model.embed(ids, visual, image_token_id=3)
    torch.testing.assert_close(embeds[0, 1:9], visual[0])
    torch.testing.assert_close(embeds[0, 0], model.decoder.embed_tokens.weight[1])
    torch.testing.assert_close(embeds[0, 9:], model.decoder.embed_tokens(ids[0, 9:]))


def test_forward_shapes(tiny_cfg):
    model = MedVLM(tiny_cfg)
    ids = torch.tensor(_prompts(tiny_cfg, [5, 5]))
    logits = model(torch.randn(2, 1, 8, 16, 16), ids, image_token_id=3)
    assert logits.shape == (2, ids.shape[1], 97)


def _wide_model(cfg, seed: int) -> MedVLM:
    """Wide weights so logits are well separated: argmax ties at float32 noise would make "identical
    tokens" a coin toss rather than a check of the generation logic."""
    torch.manual_seed(seed)
    model = MedVLM(cfg).eval()
    for p in model.parameters():
        if p.ndim >= 2:
            torch.nn.init.normal_(p, std=0.3)
    return model


def test_greedy_generation_is_deterministic_and_uses_cache_consistently(tiny_cfg):
    model = _wide_model(tiny_cfg, 0)
    volume = torch.randn(2, 1, 8, 16, 16)
    prompts = _prompts(tiny_cfg, [6, 3])  # different lengths: left padding path
    gen = GenerationConfig(max_new_tokens=10)
    first = model.generate(volume, prompts, 3, gen)
    assert first == model.generate(volume, prompts, 3, gen)
    assert all(len(row) == 10 for row in first)
    # Each row equals generating it alone, and equals greedy decoding by full recomputation.
    for i in range(2):
        alone = model.generate(volume[i:i + 1], [prompts[i]], 3, gen)[0]
        assert alone == first[i]
        # Generated tokens are text to the model, even one that happens to equal the image placeholder
        # id, so the reference splices the prompt once and appends plain token embeddings.
        with torch.no_grad():
            embeds = model.embed(torch.tensor([prompts[i]]), model.encode_image(volume[i:i + 1]), 3)
            greedy = []
            for _ in range(10):
                nxt = model.decoder(embeds)[0, -1].argmax()
                greedy.append(int(nxt))
                embeds = torch.cat([embeds, model.decoder.embed_tokens(nxt.view(1, 1))], dim=1)
        assert greedy == first[i]


def test_decisions_pick_by_the_tokens_probability_in_generation(tiny_cfg):
    # A rule fires where the generated ids end with its trigger: threshold 1 masks the decision token out
    # (the likeliest other token follows), threshold 0 keeps only it; elsewhere generation is plain greedy.
    from edgevlm.models.medvlm import apply_decisions

    model = _wide_model(tiny_cfg, 1)
    volume = torch.randn(1, 1, 8, 16, 16)
    prompts = _prompts(tiny_cfg, [5])
    plain = model.generate(volume, prompts, 3, GenerationConfig(max_new_tokens=8))[0]
    a, b = plain[0], plain[1]
    masked = model.generate(volume, prompts, 3, GenerationConfig(max_new_tokens=8, decisions=(((a,), b, 1.0),)))[0]
    with torch.no_grad():  # the reference: full recomputation, the decided step's logits with b removed
        embeds = model.embed(torch.tensor(prompts), model.encode_image(volume), 3)
        step1 = model.decoder(torch.cat([embeds, model.decoder.embed_tokens(torch.tensor([[a]]))], 1))[0, -1]
    assert masked[0] == a and masked[1] != b
    assert masked[1] == int(step1.masked_fill(torch.arange(step1.numel()) == b, float("-inf")).argmax())
    forced_token = int(step1.argsort()[-3])  # the third likeliest: only the rule can pick it
    forced = model.generate(volume, prompts, 3,
                            GenerationConfig(max_new_tokens=8, decisions=(((a,), forced_token, 0.0),)))[0]
    assert forced[:2] == [a, forced_token]
    # The rule reads probabilities: a threshold just under / over P(b) keeps / removes b.
    p_b = float(torch.softmax(step1.double(), -1)[b])
    for threshold, keeps in ((p_b * 0.999, True), (min(1.0, p_b * 1.001), False)):
        row = apply_decisions(step1.clone()[None], [[a]], (((a,), b, threshold),))[0]
        assert (int(row.argmax()) == b) == keeps and bool(torch.isinf(row).any())
    nan_free = apply_decisions(step1.clone()[None], [[a]], (((a,), b, 1.0),))
    assert not torch.isnan(nan_free).any()


def test_stop_tokens_end_generation(tiny_cfg):
    model = MedVLM(tiny_cfg).eval()
    volume = torch.randn(1, 1, 8, 16, 16)
    prompts = _prompts(tiny_cfg, [4])
    free = model.generate(volume, prompts, 3, GenerationConfig(max_new_tokens=8))[0]
    stopped = model.generate(volume, prompts, 3, GenerationConfig(max_new_tokens=8, stop_ids=(free[2],)))[0]
    assert stopped == free[: free.index(free[2]) + 1]


def test_top_p_sampling_is_seeded_and_respects_nucleus():
    logits = torch.tensor([[4.0, 3.9, -5.0, -6.0]])
    g = torch.Generator().manual_seed(1)
    draws = {int(sample(logits, 1.0, 0.5, g)) for _ in range(200)}
    assert draws == {0}  # token 0 alone already holds > 50% of the mass
    g = torch.Generator().manual_seed(1)
    draws = {int(sample(logits, 1.0, 0.99, g)) for _ in range(200)}
    assert draws == {0, 1}
    assert int(sample(logits, 0.0, 1.0, None)) == 0


def test_sampled_generation_reproducible_for_seed(tiny_cfg):
    model = MedVLM(tiny_cfg).eval()
    volume = torch.randn(1, 1, 8, 16, 16)
    prompts = _prompts(tiny_cfg, [4])
    gen = GenerationConfig(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=7)
    assert model.generate(volume, prompts, 3, gen) == model.generate(volume, prompts, 3, gen)


def test_placeholder_count_must_match(tiny_cfg):
    model = MedVLM(tiny_cfg).eval()
    with pytest.raises(ValueError, match="image placeholders"):
        model.generate(torch.randn(1, 1, 8, 16, 16), [[1, 3, 3, 5]], 3, GenerationConfig(max_new_tokens=2))
