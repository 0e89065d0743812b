"""M3D-LaMed importer: key map, dropped keys, streaming, and the ViT math against an independent reference."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

from edgevlm.checkpoint import load_checkpoint, read_config
from edgevlm.cli import app
from edgevlm.errors import EdgeVLMError
from edgevlm.importers import common, detect_importer, plan_import
from edgevlm.importers.m3d import load_m3d, load_m3d_vision
from edgevlm.models.tokenizer import train_tokenizer

VIT = "model.vision_tower.vision_tower."
runner = CliRunner()


# ------------------------------------------------------------------ independent reference of M3D's math


def m3d_vit_reference(s: dict[str, torch.Tensor], x: torch.Tensor, prefix: str = VIT, heads: int = 12,
                      patch: tuple[int, int, int] = (4, 16, 16)) -> torch.Tensor:
    """M3D's ViT3DTower (MONAI 1.3.0 ViT, perceptron patch embedding, classification=True), select_layer -1,
    select_feature "patch", written from their code without einops: returns the patch tokens (B, N, dim)."""
    b, c, d, h, w = x.shape
    p1, p2, p3 = patch
    # Rearrange "b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)" where MONAI's h, w, d are simply the
    # input's 3 spatial axes in order, i.e. our D, H, W.
    t = x.reshape(b, c, d // p1, p1, h // p2, p2, w // p3, p3)
    t = t.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (d // p1) * (h // p2) * (w // p3), p1 * p2 * p3 * c)
    pe = prefix + "patch_embedding.patch_embeddings.1."  # index 1 of Sequential(Rearrange, Linear)
    t = t @ s[pe + "weight"].T + s[pe + "bias"]
    t = t + s[prefix + "patch_embedding.position_embeddings"]  # inside PatchEmbeddingBlock: before CLS
    t = torch.cat([s[prefix + "cls_token"].expand(b, -1, -1), t], dim=1)
    dim = t.shape[-1]
    hd = dim // heads
    i = 0
    while f"{prefix}blocks.{i}.norm1.weight" in s:
        p = f"{prefix}blocks.{i}."
        # SABlock: qkv -> "b h (qkv l d) -> qkv b l h d", softmax(q k^T * hd^-0.5) v, "b h l d -> b l (h d)"
        y = F.layer_norm(t, (dim,), s[p + "norm1.weight"], s[p + "norm1.bias"], eps=1e-5)
        qkv = (y @ s[p + "attn.qkv.weight"].T).reshape(b, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax((q @ k.transpose(-1, -2)) * hd**-0.5, dim=-1)
        o = (att @ v).permute(0, 2, 1, 3).reshape(b, -1, dim)
        t = t + o @ s[p + "attn.out_proj.weight"].T + s[p + "attn.out_proj.bias"]
        # MLPBlock: linear1 -> GELU (exact) -> linear2
        y = F.layer_norm(t, (dim,), s[p + "norm2.weight"], s[p + "norm2.bias"], eps=1e-5)
        y = y @ s[p + "mlp.linear1.weight"].T + s[p + "mlp.linear1.bias"]
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        t = t + y @ s[p + "mlp.linear2.weight"].T + s[p + "mlp.linear2.bias"]
        i += 1
    t = F.layer_norm(t, (dim,), s[prefix + "norm.weight"], s[prefix + "norm.bias"], eps=1e-5)
    return t[:, 1:]  # select_feature "patch": CLS dropped


def m3d_spp_reference(s: dict[str, torch.Tensor], tokens: torch.Tensor, grid: tuple[int, int, int],
                      pool: int = 2) -> torch.Tensor:
    """SpatialPoolingProjector: "b (p1 p2 p3) d -> b d p1 p2 p3", avg_pool3d(pool), back, Linear-GELU-Linear."""
    b, _, dim = tokens.shape
    x = tokens.permute(0, 2, 1).reshape(b, dim, *grid)
    x = F.avg_pool3d(x, kernel_size=pool, stride=pool)
    x = x.reshape(b, dim, -1).permute(0, 2, 1)
    x = x @ s["model.mm_projector.projector.0.weight"].T + s["model.mm_projector.projector.0.bias"]
    x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    return x @ s["model.mm_projector.projector.2.weight"].T + s["model.mm_projector.projector.2.bias"]


def _volume(seed: int = 3) -> torch.Tensor:
    # M3D's real input geometry (1 x 32 x 256 x 256, values in 0..1), not a symmetric one, so a D/H/W or
    # patch-axis mix-up changes the result.
    return torch.rand(1, 1, 32, 256, 256, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ tests


def test_phi3_folder_maps_every_key_and_lists_dropped(make_m3d, caplog):
    folder, state = make_m3d("phi3")
    assert detect_importer(folder) == "m3d-lamed"
    with caplog.at_level(logging.WARNING, logger="edgevlm.importers"):
        plan = plan_import(folder)
    seg = {k for k in state if k.startswith(("model.seg_module.", "model.seg_projector."))}
    assert set(plan.dropped) == seg  # listed, with a reason each
    assert set(plan.key_map) | set(plan.dropped) == set(state)  # every key consumed or dropped
    assert "seg_module" in caplog.text and "dropped" in caplog.text  # and announced
    cfg = plan.config
    assert cfg.decoder.vocab_size == 32015 and cfg.decoder.fused_qkv and cfg.decoder.fused_gate_up
    assert (cfg.vision.dim, cfg.vision.depth, cfg.vision.heads, cfg.vision.mlp_dim) == (96, 2, 12, 192)
    assert cfg.vision.image_size == (32, 256, 256) and cfg.vision.patch_size == (4, 16, 16)
    assert cfg.num_visual_tokens == 256 and cfg.preprocess == "m3d-lamed"
    assert cfg.prompt.image_token == "<im_patch>" and cfg.prompt.max_new_tokens == 256 and not cfg.prompt.do_sample
    assert cfg.prompt.eos_tokens == ("<|endoftext|>",)


def test_load_checkpoint_autodetects_and_places_tensors(make_m3d):
    folder, state = make_m3d("phi3")
    ckpt = load_checkpoint(folder)
    assert ckpt.kind == "m3d-lamed" and ckpt.extra["imported_from"] == "m3d-lamed"
    sd = ckpt.model.state_dict()
    for src, dst in [
        (VIT + "patch_embedding.patch_embeddings.1.weight", "vision.patch_embed.weight"),
        (VIT + "patch_embedding.position_embeddings", "vision.pos_embed"),
        (VIT + "cls_token", "vision.cls_token"),
        (VIT + "blocks.1.attn.qkv.weight", "vision.blocks.1.attn.qkv.weight"),
        ("model.mm_projector.projector.2.weight", "projector.linear2.weight"),
        ("model.layers.1.self_attn.qkv_proj.weight", "decoder.layers.1.self_attn.qkv_proj.weight"),
        ("model.layers.0.mlp.gate_up_proj.weight", "decoder.layers.0.mlp.gate_up_proj.weight"),
        ("model.embed_tokens.weight", "decoder.embed_tokens.weight"),
        ("lm_head.weight", "decoder.lm_head.weight"),
    ]:
        assert torch.equal(sd[dst], state[src]), dst
    # The full model runs: BOS + 256 placeholders + question -> logits over the checkpoint's real vocabulary.
    ids = torch.tensor([[1] + [32011] * 256 + [5, 6, 7]])
    with torch.no_grad():
        logits = ckpt.model(_volume(), ids, image_token_id=32011)
    assert logits.shape == (1, 260, 32015) and torch.isfinite(logits).all()


def test_vision_and_projector_equal_independent_m3d_math(make_m3d):
    folder, state = make_m3d("phi3")
    model, _ = load_m3d(folder)
    x = _volume()
    with torch.no_grad():
        ours_tokens = model.vision.patch_tokens(x)
        ref_tokens = m3d_vit_reference(state, x)
        ours_visual = model.encode_image(x)
        ref_visual = m3d_spp_reference(state, ref_tokens, grid=(8, 16, 16))
    assert ours_tokens.shape == (1, 2048, 96) and ours_visual.shape == (1, 256, 64)
    torch.testing.assert_close(ours_tokens, ref_tokens, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_visual, ref_visual, rtol=1e-4, atol=1e-4)
    # The check has teeth: reading the patch axes in another order gives a different answer.
    wrong = m3d_vit_reference(state, x.transpose(3, 4).contiguous())
    assert not torch.allclose(ours_tokens, wrong, atol=1e-3)


def test_llama2_variant(make_m3d):
    folder, state = make_m3d("llama2", vocab=32004)
    state_vocab = state["model.embed_tokens.weight"].shape[0]
    ckpt = load_checkpoint(folder)
    cfg = ckpt.config
    assert cfg.name == "m3d-lamed-llama2" and not cfg.decoder.fused_qkv and not cfg.decoder.fused_gate_up
    assert cfg.decoder.vocab_size == state_vocab  # from the embedding, not config.json
    assert any("vocab_size" in n for n in ckpt.extra["import_notes"])
    assert cfg.prompt.eos_tokens == ("</s>",) and cfg.prompt.pad_token == "<unk>"
    sd = ckpt.model.state_dict()
    assert torch.equal(sd["decoder.layers.1.self_attn.k_proj.weight"], state["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(sd["decoder.layers.0.mlp.up_proj.weight"], state["model.layers.0.mlp.up_proj.weight"])


def test_fp16_cast_on_load(make_m3d):
    folder, state = make_m3d("phi3")
    ckpt = load_checkpoint(folder, dtype=torch.float16)
    assert {p.dtype for p in ckpt.model.parameters()} == {torch.float16}
    sd = ckpt.model.state_dict()
    assert torch.equal(sd["decoder.layers.0.self_attn.qkv_proj.weight"],
                       state["model.layers.0.self_attn.qkv_proj.weight"].half())


def test_streams_one_shard_at_a_time_and_never_reads_dropped(make_m3d, monkeypatch):
    folder, _ = make_m3d("phi3", shards=4)
    plan = plan_import(folder)
    real = common.safe_open
    open_now, peak, read = [0], [0], []

    class Tracked:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            open_now[0] += 1
            peak[0] = max(peak[0], open_now[0])
            self.h = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            open_now[0] -= 1
            return self.f.__exit__(*exc)

        def keys(self):
            return self.h.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.h.get_tensor(name)

    monkeypatch.setattr(common, "safe_open", Tracked)
    n = sum(1 for _ in plan.tensors())
    assert n == len(plan.key_map) == len(read)
    assert peak[0] == 1
    assert not any("seg_" in name for name in read)


def test_unknown_key_is_an_error_naming_it(make_m3d):
    folder, _ = make_m3d("phi3", extra_keys={"model.report_head.weight": torch.zeros(4, 4)})
    with pytest.raises(EdgeVLMError, match=r"unknown key.*model\.report_head\.weight"):
        load_checkpoint(folder)


def test_monai_14_cross_attention_keys_are_dropped_not_unknown(make_m3d):
    extra = {VIT + "blocks.0.norm_cross_attn.weight": torch.ones(96),
             VIT + "blocks.0.cross_attn.to_q.weight": torch.zeros(96, 96)}
    folder, _ = make_m3d("phi3", extra_keys=extra)
    plan = plan_import(folder)
    assert set(extra) <= set(plan.dropped)
    assert any("cross-attention" in line for line in plan.dropped_summary())


def test_unsupported_m3d_settings_are_refused(make_m3d):
    folder, _ = make_m3d("phi3", proj_pooling_type="sequence")
    with pytest.raises(EdgeVLMError, match="proj_pooling_type='sequence'"):
        read_config(folder)


def test_mis_shaped_key_is_reported_before_loading(make_m3d):
    folder, _ = make_m3d("phi3", num_hidden_layers=2, hidden_size=64, intermediate_size=96)
    with pytest.raises(EdgeVLMError, match=r"mis-shaped.*gate_up_proj"):
        plan_import(folder)


def test_forced_from_and_bad_values(make_m3d, tmp_path):
    folder, _ = make_m3d("phi3")
    assert read_config(folder, from_="m3d-lamed")[0].name == "m3d-lamed-phi3"
    with pytest.raises(EdgeVLMError, match="unknown --from"):
        read_config(folder, from_="radfm")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    save_file({"foo": torch.zeros(2)}, str(other / "model.safetensors"))
    with pytest.raises(EdgeVLMError, match="not an M3D-LaMed checkpoint"):
        load_checkpoint(other, from_="m3d-lamed")


def test_tokenizer_json_used_and_sentencepiece_only_explained(make_m3d):
    folder, _ = make_m3d("phi3", name="with_json")
    tok = train_tokenizer(["a liver lesion", "no acute findings"], 300,
                          special_tokens=("<unk>", "<s>", "<|endoftext|>", "<im_patch>"))
    (folder / "tokenizer.json").write_text(tok.to_str())
    assert read_config(folder)[1] == tok.to_str()

    folder2, _ = make_m3d("phi3", name="sp_only")
    (folder2 / "tokenizer.model").write_bytes(b"\x00sentencepiece")
    _, tokenizer_json, extra = read_config(folder2)
    assert tokenizer_json is None
    note = " ".join(extra["import_notes"])
    assert "tokenizer.model" in note and "offline" in note and "save_pretrained" in note


def test_bare_pretrained_vit_bin(vit_bin):
    path, state = vit_bin
    assert detect_importer(path) == "m3d-lamed"
    encoder, plan = load_m3d_vision(path)
    assert plan.vision_only and plan.dropped == {}
    x = _volume(5)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x)[:, 1:], m3d_vit_reference(state, x, prefix=""), rtol=1e-4, atol=1e-4)
    # Not a whole model: load_checkpoint says what to do instead of guessing a decoder.
    with pytest.raises(EdgeVLMError, match="load_m3d_vision"):
        load_checkpoint(path)


def test_vision_from_full_folder_reads_only_the_vit(make_m3d):
    folder, state = make_m3d("phi3")
    encoder, _ = load_m3d_vision(folder, dtype=torch.float16)
    assert encoder.patch_embed.weight.dtype == torch.float16
    assert torch.equal(encoder.blocks[0].attn.qkv.weight, state[VIT + "blocks.0.attn.qkv.weight"].half())


def test_native_checkpoints_are_not_detected(tmp_path):
    save_file({"vision.patch_embed.weight": torch.zeros(2, 2)}, str(tmp_path / "m.safetensors"))
    assert detect_importer(tmp_path / "m.safetensors") is None
    torch.save({"state_dict": {"vision.x": torch.zeros(1)}}, tmp_path / "m.pt")
    assert detect_importer(tmp_path / "m.pt") is None


# ------------------------------------------------------------------ CLI


def test_info_on_m3d_folder(make_m3d):
    folder, _ = make_m3d("phi3")
    for args in (["info", str(folder)], ["info", str(folder), "--from", "m3d-lamed"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "imported from m3d-lamed" in result.output and "seg_module" in result.output
        assert "vocab 32015" in result.output and "fused qkv/gate_up" in result.output
    result = runner.invoke(app, ["info", str(folder), "--json"])
    summary = json.loads(result.output)
    assert summary["import"]["from"] == "m3d-lamed" and summary["visual_tokens"] == 256


def test_info_on_vit_bin_and_bad_from(vit_bin, tmp_path):
    path, _ = vit_bin
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "vision tower only" in result.output
    result = runner.invoke(app, ["info", str(path), "--from", "nope"])
    assert result.exit_code == 2 and "unknown --from" in result.output
