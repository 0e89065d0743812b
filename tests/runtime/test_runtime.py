"""Runtime: one generate API over ort and torch, preallocated caches, and bundle verification."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgevlm.errors import EdgeVLMError
from edgevlm.runtime import PeakMemory, choose_providers, load_bundle, stage_rows, verify_bundle


def _volumes(n: int, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((8, 16, 16), dtype=np.float32) for _ in range(n)]


def test_ort_and_torch_backends_give_identical_greedy_tokens(gqa_bundle):
    _, bundle = gqa_bundle
    ort_s = load_bundle(bundle, backend="ort", threads=1)
    torch_s = load_bundle(bundle, backend="torch", threads=1)  # finds the checkpoint from the manifest
    assert ort_s.providers == ["CPUExecutionProvider"] and torch_s.providers == ["torch-cpu"]
    questions = ["Is there a pleural effusion?", None, "Describe the lungs."]
    for volume, question in zip(_volumes(3), questions, strict=True):
        a = ort_s.generate(volume, question, max_new_tokens=8)
        b = torch_s.generate(volume, question, max_new_tokens=8)
        assert a.token_ids == b.token_ids and a.text == b.text
        assert set(a.timings_ms) == {"preprocess", "vision", "prefill", "decode", "total"}
        assert a.prompt == (question or ort_s.config.prompt.default_question)


def test_logits_match_between_backends_at_every_step(gqa_bundle):
    _, bundle = gqa_bundle
    volume = _volumes(1)[0]
    a = load_bundle(bundle).generate(volume, max_new_tokens=6, collect_logits=True)
    b = load_bundle(bundle, backend="torch").generate(volume, max_new_tokens=6, collect_logits=True)
    assert len(a.logits) == len(b.logits) == len(a.token_ids)
    for la, lb in zip(a.logits, b.logits, strict=True):
        np.testing.assert_allclose(la, lb, atol=1e-4)


def test_decisions_decide_alike_on_both_backends(gqa_bundle):
    # The rule's trigger is a token plain greedy emits, so it is sure to fire; threshold 1 removes the token
    # greedy picked next, and both backends must then pick the same other one.
    from dataclasses import replace

    from edgevlm.models.tokenizer import encode_prompt, special_ids
    from edgevlm.runtime.session import generate_ids

    _, bundle = gqa_bundle
    sessions = [load_bundle(bundle, threads=1), load_bundle(bundle, backend="torch", threads=1)]
    cfg, tok = sessions[0].config, sessions[0].tokenizer
    image_id = special_ids(tok, cfg.prompt).image
    prompt = encode_prompt(tok, cfg, None)
    for volume in _volumes(3, seed=5):
        array = sessions[0].preprocess(volume)
        gen = sessions[0].generation_config(8, ignore_stop=True)
        plain = generate_ids(sessions[0].backend, sessions[0].table, array, [prompt], image_id, gen)[0]
        decided = replace(gen, decisions=(((plain[0],), plain[1], 1.0),))
        outs = [generate_ids(s.backend, s.table, array, [prompt], image_id, decided)[0] for s in sessions]
        assert outs[0] == outs[1]
        assert outs[0][0] == plain[0] and outs[0][1] != plain[1]


def test_kv_cache_is_allocated_once_and_reused(gqa_bundle):
    _, bundle = gqa_bundle
    session = load_bundle(bundle)
    volume = _volumes(1)[0]
    first = session.generate(volume, max_new_tokens=5)
    state = session.backend._state
    assert len(state["sets"]) == 1  # kv_in_place: past_i and present_i share one buffer
    buffers = [id(v) for bufs in state["sets"] for v in bufs]
    pointers = [a.ctypes.data for bufs in state["host"] for a in bufs]
    second = session.generate(volume, max_new_tokens=5)
    assert second.token_ids == first.token_ids  # stale cache contents never leak into the next run
    assert [id(v) for bufs in session.backend._state["sets"] for v in bufs] == buffers
    assert [a.ctypes.data for bufs in session.backend._state["host"] for a in bufs] == pointers


def test_threads_and_providers_are_applied_and_recorded(gqa_bundle):
    _, bundle = gqa_bundle
    session = load_bundle(bundle, threads=1)
    for graph in (session.backend.vision, session.backend.decoder):
        options = graph.get_session_options()
        assert options.intra_op_num_threads == 1
        # idle threads stop spinning after each Run (backends.session_options: they slowed preprocessing)
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert choose_providers() == ["CPUExecutionProvider"]  # no GPU provider in this environment
    with pytest.raises(EdgeVLMError, match="CUDAExecutionProvider"):
        choose_providers(["CUDAExecutionProvider"])


def test_wrong_volume_shape_is_a_one_line_error(gqa_bundle):
    session = load_bundle(gqa_bundle[1])
    with pytest.raises(EdgeVLMError, match=r"\(D, H, W\) = \(8, 16, 16\)"):
        session.generate(np.zeros((8, 16, 17), np.float32))


def _copy(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def _rewrite_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))
    return m


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("tamper", "does not match its sha256"),
        ("truncate", "bytes, the manifest says"),
        ("missing", "decoder.onnx is missing"),
        ("extra", "files its manifest does not list"),
        ("no-manifest", "manifest.json is missing"),
        ("newer-edgevlm", "written by edgevlm 99.0.0"),
        ("newer-schema", "schema 2"),
        ("corrupt-rehashed", "onnxruntime cannot load"),
    ],
)
def test_damaged_bundles_are_refused_with_one_line(gqa_bundle, tmp_path, damage, message):
    from edgevlm.checkpoint import file_sha256

    b = _copy(gqa_bundle[1], tmp_path)
    if damage == "tamper":  # same size, one byte changed
        data = bytearray((b / "tokenizer.json").read_bytes())
        data[10] ^= 1
        (b / "tokenizer.json").write_bytes(bytes(data))
    elif damage == "truncate":
        (b / "vision.onnx").write_bytes((b / "vision.onnx").read_bytes()[:1000])
    elif damage == "missing":
        (b / "decoder.onnx").unlink()
    elif damage == "extra":
        (b / "notes.txt").write_text("hello")
    elif damage == "no-manifest":
        (b / "manifest.json").unlink()
    elif damage == "newer-edgevlm":
        _rewrite_manifest(b, edgevlm_version="99.0.0")
    elif damage == "newer-schema":
        _rewrite_manifest(b, schema_version=2)
    elif damage == "corrupt-rehashed":  # garbage that even matches its (rewritten) hash reaches onnxruntime
        (b / "decoder.onnx").write_bytes(b"\x08\x07garbage" * 50)
        m = json.loads((b / "manifest.json").read_text())
        m["files"]["decoder.onnx"] = {"sha256": file_sha256(b / "decoder.onnx"), "bytes": 450}
        (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EdgeVLMError, match=message) as err:
        load_bundle(b)
    assert "\n" not in str(err.value)


def test_torch_backend_refuses_a_different_checkpoint(gqa_bundle, tmp_path):
    from edgevlm.export.testing import make_checkpoint, tiny_config

    other = make_checkpoint(tmp_path / "other.safetensors", tiny_config("gqa"), seed=1)
    with pytest.raises(EdgeVLMError, match="not the one this bundle was exported from"):
        load_bundle(gqa_bundle[1], backend="torch", checkpoint=other)
    with pytest.raises(EdgeVLMError, match="--checkpoint"):
        load_bundle(gqa_bundle[1], backend="torch", checkpoint=tmp_path / "gone.safetensors")
    assert verify_bundle(gqa_bundle[1]).bundle_id


def test_peak_memory_catches_a_transient_allocation_and_profile_rows(gqa_bundle):
    import mmap
    import time

    import psutil

    before = psutil.Process().memory_info().rss
    with PeakMemory(interval_s=0.001) as mem:
        # 64 MiB of fresh anonymous pages, touched, then unmapped before the block ends. A plain np.ones
        # may be served from heap pages that an earlier test freed but the allocator kept resident:
        # then RSS does not move at all (seen in the full suite).
        region = mmap.mmap(-1, 64 * 2**20)
        np.frombuffer(region, dtype=np.uint8)[:] = 1
        deadline = time.monotonic() + 2.0  # held until sampled (at most 2 s on a loaded machine)
        while mem.peak_rss_bytes < before + 56 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.01)
        region.close()
    assert mem.peak_rss_bytes >= before + 56 * 2**20
    assert psutil.Process().memory_info().rss < mem.peak_rss_bytes
    result = load_bundle(gqa_bundle[1]).generate(_volumes(1)[0], max_new_tokens=4)
    names = [row[0] for row in stage_rows(result, load_ms=1.0, read_ms=2.0, memory=mem)]
    assert names == ["load", "read study", "preprocess", "vision", "prefill", "decode", "total", "peak RSS"]
