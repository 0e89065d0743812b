import math

import pytest
import torch

from edgevlm.models import Decoder, DecoderConfig, setup_cache
from edgevlm.models.decoder import rope_inv_freq
from edgevlm.models.medvlm import init_weights


def _decoder(**overrides) -> Decoder:
    cfg = DecoderConfig(**{"vocab_size": 101, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                           "intermediate_size": 128, "max_seq_len": 96, **overrides})
    dec = Decoder(cfg).eval()
    dec.apply(init_weights)
    return dec


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("variant", [{}, {"fused_qkv": True, "fused_gate_up": True}, {"qkv_bias": True},
                                     {"n_kv_heads": 4, "tie_embeddings": True}])
def test_kv_cache_decoding_matches_full_forward(batch, variant):
    dec = _decoder(**variant)
    if variant.get("qkv_bias"):
        for layer in dec.layers:  # non-zero biases so the switch is really exercised
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    embeds = torch.randn(batch, 30, 64)
    with torch.no_grad():
        full = dec(embeds)
        cache = setup_cache(dec.cfg, batch, 48)
        pieces = [dec(embeds[:, :7], torch.arange(7), cache)]  # prefill, then one token at a time
        pieces += [dec(embeds[:, i:i + 1], torch.tensor([i]), cache) for i in range(7, 30)]
    stepped = torch.cat(pieces, dim=1)
    assert torch.isfinite(stepped).all()
    assert (stepped - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_decoding_over_the_written_prefix_matches_full_forward(n_kv_heads):
    """kv_len (attend over the slots written so far) and last_only, as MedVLM.generate steps, in float64."""
    dec = _decoder(n_kv_heads=n_kv_heads).double()
    embeds = torch.randn(2, 20, 64, dtype=torch.float64)
    with torch.no_grad():
        full = dec(embeds)
        cache = setup_cache(dec.cfg, 2, 64, dtype=torch.float64)
        prefill = dec(embeds[:, :5], torch.arange(5), cache, kv_len=5, last_only=True)
        steps = [dec(embeds[:, i:i + 1], torch.tensor([i]), cache, kv_len=i + 1, last_only=True) for i in range(5, 20)]
    assert prefill.shape == (2, 1, 101)
    stepped = torch.cat([prefill, *steps], dim=1)
    assert torch.isfinite(stepped).all()
    assert (stepped - full[:, 4:]).abs().max().item() <= 1e-10


def test_left_padding_with_rope_positions_matches_unpadded():
    dec = _decoder()
    embeds = torch.randn(1, 10, 64)
    with torch.no_grad():
        ref = dec(embeds)
        padded = torch.cat([torch.randn(1, 3, 64), embeds], dim=1)
        cache = setup_cache(dec.cfg, 1, 16)
        valid = torch.arange(16)[None] >= 3
        rope = (torch.arange(13) - 3).clamp(min=0)[None]
        out = dec(padded, torch.arange(13), cache, rope, valid)
    assert (out[:, 3:] - ref).abs().max().item() <= 1e-5


def test_gqa_shares_kv_heads():
    dec = _decoder(n_heads=4, n_kv_heads=1)
    assert dec.layers[0].self_attn.k_proj.weight.shape == (16, 64)
    assert dec(torch.randn(2, 5, 64)).shape == (2, 5, 101)


def test_rope_scaling_variants():
    base = DecoderConfig(dim=64, n_heads=4, n_layers=1, vocab_size=8, max_seq_len=64)
    inv, amp = rope_inv_freq(base)
    assert amp == 1.0 and inv[0] == 1.0
    lin, _ = rope_inv_freq(DecoderConfig(**{**base.__dict__, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}))
    torch.testing.assert_close(lin, inv / 4)
    l3, _ = rope_inv_freq(DecoderConfig(**{**base.__dict__, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}))
    assert l3[0] == inv[0]  # highest frequency kept
    assert math.isclose(l3[-1].item(), inv[-1].item() / 8, rel_tol=1e-9)  # lowest slowed by the factor
    factors = [1.0 + i for i in range(8)]
    lr, amp = rope_inv_freq(DecoderConfig(**{**base.__dict__, "max_seq_len": 128, "rope_scaling": {
        "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": factors,
        "original_max_position_embeddings": 32}}))
    torch.testing.assert_close(lr, inv / torch.tensor(factors, dtype=torch.float64))
    assert amp == pytest.approx(math.sqrt(1 + math.log(4) / math.log(32)))
    with pytest.raises(ValueError, match="unsupported rope_scaling"):
        rope_inv_freq(DecoderConfig(**{**base.__dict__, "rope_scaling": {"rope_type": "yarn", "factor": 2}}))


def test_cache_longer_than_max_seq_is_refused():
    dec = _decoder()
    with pytest.raises(ValueError, match="max_seq_len"):
        setup_cache(dec.cfg, 1, 97)
