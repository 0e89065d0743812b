"""Export: graphs with dynamic axes, parity on several decoder/vision variants, manifest, atomicity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from edgevlm.export import THRESHOLDS, DecoderStep, ParityThresholds, export_bundle
from edgevlm.export import bundle as bundle_module
from edgevlm.export.testing import make_checkpoint, tiny_bundle, tiny_config

from edgevlm import __version__
from edgevlm.checkpoint import file_sha256, load_checkpoint
from edgevlm.errors import EdgeVLMError
from edgevlm.models import GenerationConfig, MedVLMConfig
from edgevlm.models.tokenizer import encode_prompt, load_tokenizer, special_ids
from edgevlm.runtime import load_bundle


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("variant", ["gqa", "fused", "tied"])
def test_export_parity_and_model_generate_agree(variant, bundles_dir):
    """Each variant exports, passes the fp32 gate (recorded), and the ort bundle reproduces the model's own
    MedVLM.generate token for token."""
    ckpt_path, bundle = tiny_bundle(bundles_dir, variant)
    manifest = json.loads((bundle / "manifest.json").read_text())
    parity = manifest["parity"]
    assert parity["passed"] and parity["failures"] == []
    assert parity["vision_cosine_min"] >= 0.9999 and parity["logits_max_abs_diff"] <= 1e-3
    assert all(run["tokens_equal"] for run in parity["generation"])
    assert "edgevlm.data synthetic chest CT" in parity["inputs"]

    ckpt = load_checkpoint(ckpt_path)
    tok = load_tokenizer(ckpt.tokenizer_json)
    ids = special_ids(tok, ckpt.config.prompt)
    session = load_bundle(bundle)
    volume = np.random.default_rng(1).random(ckpt.config.vision.image_size, dtype=np.float32)
    result = session.generate(volume, "Is there a pleural effusion?", max_new_tokens=6)
    prompt = encode_prompt(tok, ckpt.config, "Is there a pleural effusion?")
    expected = ckpt.model.generate(torch.from_numpy(volume)[None, None], [prompt], ids.image,
                                   GenerationConfig(max_new_tokens=6, stop_ids=ids.stop, pad_id=ids.pad))[0]
    assert result.token_ids == expected


def test_decoder_graph_has_symbolic_axes_and_runs_unseen_sizes(gqa_bundle):
    """Exported at batch 2 / seq 3 / cache 7; runs at batch 1 and 3, seq 1 (decode) and 4, cache 5 and 11."""
    import onnxruntime as ort

    ckpt_path, bundle = gqa_bundle
    graph = onnx.load(str(bundle / "decoder.onnx"))
    inputs = {i.name: _dims(i) for i in graph.graph.input}
    assert inputs["embeds"] == ["batch", "seq", 48]
    assert inputs["past_k_0"] == ["batch", 2, "cache_len", 12]
    assert _dims(graph.graph.output[0]) == ["batch", 320]
    assert _dims(onnx.load(str(bundle / "vision.onnx")).graph.input[0]) == ["batch", 1, 8, 16, 16]

    model = load_checkpoint(ckpt_path).model
    step = DecoderStep(model, functional=True).eval()
    sess = ort.InferenceSession(str(bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    for b, t, s in [(1, 1, 5), (3, 4, 11)]:
        past = [torch.randn(b, 2, s, 12, generator=gen) for _ in range(4)]
        args = (torch.randn(b, t, 48, generator=gen), torch.arange(1, 1 + t), torch.arange(t)[None].repeat(b, 1),
                torch.rand(b, s, generator=gen) > 0.2, *past)
        with torch.no_grad():
            ref = step(*args)
        out = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args, strict=True)})
        for o, r in zip(out, ref, strict=True):
            np.testing.assert_allclose(o, r.numpy(), atol=1e-5, rtol=1e-5)


def test_manifest_records_versions_hashes_and_config(gqa_bundle):
    ckpt_path, bundle = gqa_bundle
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["format"] == "edgevlm-bundle" and m["schema_version"] == 1 and m["edgevlm_version"] == __version__
    assert set(m["versions"]) >= {"edgevlm", "torch", "onnx", "onnxruntime"}
    assert m["opsets"]["decoder.onnx"]["ai.onnx"] == 18 and m["exporter"] == "torch.onnx.export(dynamo=True)"
    assert m["source"]["sha256"] == file_sha256(ckpt_path)
    assert set(m["files"]) == {"vision.onnx", "decoder.onnx", "embeddings.safetensors", "tokenizer.json",
                               "preprocess.json"}
    for name, entry in m["files"].items():
        assert entry["sha256"] == file_sha256(bundle / name)
    assert MedVLMConfig.from_dict(m["model"]) == tiny_config("gqa")
    assert json.loads((bundle / "preprocess.json").read_text())["grid"] == [8, 16, 16]
    assert m["graphs"]["decoder"]["kv_in_place"] is True  # past caches feed one scatter each, nothing else
    assert not list(bundle.parent.glob(".*partial*"))


def _reuse_graphs(monkeypatch, good):
    """Skip the (slow) tracing: the export steps copy the shared bundle's graphs; parity still runs."""

    def copy_graph(model, path, *args):
        shutil.copyfile(good / path.name, path)

    monkeypatch.setattr(bundle_module, "export_vision", copy_graph)
    monkeypatch.setattr(bundle_module, "export_decoder", copy_graph)


def test_interrupted_export_leaves_no_half_bundle_and_keeps_the_old_one(gqa_bundle, tmp_path, monkeypatch):
    ckpt_path, good = gqa_bundle
    _reuse_graphs(monkeypatch, good)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # the worst case: not even an Exception

    monkeypatch.setattr(bundle_module, "measure_parity", boom)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(ckpt_path, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # no bundle, no .partial folder

    old = tmp_path / "old"
    shutil.copytree(good, old)
    before = {p.name: file_sha256(p) for p in old.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        export_bundle(ckpt_path, old, overwrite=True)
    assert {p.name: file_sha256(p) for p in old.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_parity_miss_is_a_one_line_error_and_writes_nothing(gqa_bundle, tmp_path, monkeypatch):
    ckpt_path, good = gqa_bundle
    _reuse_graphs(monkeypatch, good)
    impossible = ParityThresholds(vision_cosine_min=1.5, logits_max_abs_diff=1e-3, relative_logits=False,
                                  exact_tokens=True)
    monkeypatch.setitem(THRESHOLDS, "fp32", impossible)
    with pytest.raises(EdgeVLMError, match="parity gate: vision cosine") as err:
        export_bundle(ckpt_path, tmp_path / "b")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_are_refused_before_export(tmp_path):
    cfg = tiny_config("gqa")
    cfg.preprocess = "m3d-lamed"  # a 32x256x256 recipe for an 8x16x16 encoder
    ckpt = make_checkpoint(tmp_path / "m.safetensors", cfg)
    with pytest.raises(EdgeVLMError, match="recipe 'm3d-lamed' makes a"):
        export_bundle(ckpt, tmp_path / "b")
    with pytest.raises(EdgeVLMError, match="--precision"):
        export_bundle(ckpt, tmp_path / "b", precision="int3")
    (tmp_path / "exists").mkdir()
    with pytest.raises(EdgeVLMError, match="--overwrite"):
        export_bundle(ckpt, tmp_path / "exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "m.safetensors"]
