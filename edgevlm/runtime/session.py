"""`load_bundle` -> `Session.generate(volume, question) -> Result`: one API over the ort and torch backends.

The generation loop lives here, once, in numpy: token embeddings are rows gathered from the bundle's
table and the visual tokens are spliced in at the image placeholders (no image logic in any graph);
the backend computes vision tokens and decoder steps over its preallocated KV cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgevlm.errors import EdgeVLMError
from edgevlm.models import GenerationConfig, MedVLMConfig
from edgevlm.runtime.backends import OrtBackend, default_threads, torch_backend_from_checkpoint
from edgevlm.runtime.bundle import (
    DECODER_FILE,
    EMBEDDINGS_FILE,
    PREPROCESS_FILE,
    TOKENIZER_FILE,
    VISION_FILE,
    Bundle,
    verify_bundle,
)
from edgevlm.volume import Volume

BACKENDS = ("ort", "torch")


@dataclass
class Result:
    text: str
    token_ids: list[int]
    prompt: str
    timings_ms: dict[str, float]  # preprocess, vision, prefill, decode, total (this call, not loading)
    n_prompt_tokens: int
    backend: str
    providers: list[str]
    logits: list[np.ndarray] | None = field(default=None, repr=False)  # per step, when asked for (parity)

    @property
    def n_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_ms_per_token(self) -> float | None:
        # The first new token comes from prefill; decode steps produce the rest.
        steps = self.n_new_tokens - 1
        return self.timings_ms["decode"] / steps if steps > 0 else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        per = self.decode_ms_per_token
        return 1000.0 / per if per else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("logits")
        d.update(n_new_tokens=self.n_new_tokens, decode_ms_per_token=self.decode_ms_per_token,
                 decode_tokens_per_s=self.decode_tokens_per_s)
        return d


def splice_embeddings(table: np.ndarray, ids: np.ndarray, visual: np.ndarray, image_id: int) -> np.ndarray:
    """Rows of `table` for ids (B, T), with the k-th image placeholder of each row set to visual[:, k].

    Every row holds exactly M placeholders (checked by the caller), so boolean assignment in row-major
    order puts visual token k of row b at that row's k-th placeholder.
    """
    is_image = ids == image_id
    # In the wider of the two dtypes: quantized bundles store the table fp16 but run fp32 graphs, and
    # their visual tokens must not be rounded to fp16 on the way in.
    embeds = table[np.where(is_image, 0, ids)].astype(np.result_type(table.dtype, visual.dtype), copy=False)
    embeds[is_image] = visual.reshape(-1, visual.shape[-1]).astype(embeds.dtype)
    return embeds


def generate_ids(backend: Any, table: np.ndarray, volume: np.ndarray, prompts: Sequence[Sequence[int]],
                 image_id: int, gen: GenerationConfig, timings_ms: dict[str, float] | None = None,
                 logits_out: list[np.ndarray] | None = None) -> list[list[int]]:
    """Greedy or top-p generation for B prompts (one preprocessed volume (B, 1, D, H, W) each).

    Mirrors `MedVLM.generate`: prompts left-padded to a common length, padded slots never attended,
    rotary positions counted from each row's first real token; prefill once, then one step per token.
    """
    import torch

    from edgevlm.models import sample
    from edgevlm.models.medvlm import apply_decisions

    timings_ms = {} if timings_ms is None else timings_ms
    b = len(prompts)
    t0 = time.perf_counter()
    visual = backend.encode(volume)
    backend.sync()
    t1 = time.perf_counter()
    timings_ms["vision"] = (t1 - t0) * 1000
    n_visual = visual.shape[1]
    for row in prompts:
        n = sum(1 for tok in row if tok == image_id)
        if n != n_visual:
            raise EdgeVLMError(f"prompt has {n} image placeholders, the model produces {n_visual} visual tokens")
    t = max(len(p) for p in prompts)
    total = t + gen.max_new_tokens
    pad = np.array([t - len(p) for p in prompts], dtype=np.int64)
    ids = np.full((b, t), gen.pad_id, dtype=np.int64)
    for i, row in enumerate(prompts):
        ids[i, t - len(row):] = row
    slots = np.arange(total, dtype=np.int64)
    key_valid = slots[None, :] >= pad[:, None]  # (B, S)
    backend.reset_cache(b, total)
    generator = None
    if gen.temperature > 0:
        generator = torch.Generator().manual_seed(0 if gen.seed is None else gen.seed)

    out: list[list[int]] = [[] for _ in range(b)]

    def pick(logits: np.ndarray) -> np.ndarray:
        if logits_out is not None:
            logits_out.append(logits.copy())
        if gen.decisions:
            logits = apply_decisions(logits.copy(), out, gen.decisions)
        if gen.temperature <= 0:
            return logits.argmax(axis=-1)
        return sample(torch.from_numpy(logits), gen.temperature, gen.top_p, generator).numpy()

    input_pos = slots[:t]
    rope_pos = np.clip(input_pos[None, :] - pad[:, None], 0, None)
    logits = backend.step(splice_embeddings(table, ids, visual, image_id), input_pos, rope_pos, key_valid)
    token = pick(logits)
    backend.sync()
    t2 = time.perf_counter()
    timings_ms["prefill"] = (t2 - t1) * 1000
    stop = np.array(list(gen.stop_ids), dtype=np.int64)
    finished = np.zeros(b, dtype=bool)
    for step in range(gen.max_new_tokens):
        for i in range(b):
            if not finished[i]:
                out[i].append(int(token[i]))
        finished |= np.isin(token, stop)
        if finished.all() or step == gen.max_new_tokens - 1:
            break
        pos = slots[t + step: t + step + 1]
        logits = backend.step(table[token][:, None, :], pos, pos[None, :] - pad[:, None], key_valid)
        token = pick(logits)
    backend.sync()
    timings_ms["decode"] = (time.perf_counter() - t2) * 1000
    return out


@dataclass
class Session:
    """A loaded, verified bundle on one backend. `generate` takes a Volume or a preprocessed array."""

    bundle: Bundle
    config: MedVLMConfig
    recipe: Any  # edgevlm.preprocess.Recipe
    tokenizer: Any  # tokenizers.Tokenizer
    table: np.ndarray  # (vocab, dim) token embeddings
    backend: Any  # OrtBackend | TorchBackend
    load_ms: float = 0.0

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def providers(self) -> list[str]:
        return list(self.backend.providers)

    def preprocess(self, volume: Volume | np.ndarray) -> np.ndarray:
        """A Volume through the bundle's recipe, or an already preprocessed array, as (1, 1, D, H, W)."""
        if isinstance(volume, Volume):
            from edgevlm.preprocess import preprocess

            volume = preprocess(volume, self.recipe)
        array = np.asarray(volume, dtype=np.float32)
        expected = tuple(self.config.vision.image_size)
        if array.ndim == 3:
            array = array[None, None]
        if array.ndim != 5 or tuple(array.shape[1:]) != (1, *expected):
            raise EdgeVLMError(f"preprocessed volume must be (D, H, W) = {expected} or (B, 1, *that), got shape "
                               f"{tuple(array.shape)}")
        return array

    def generation_config(self, max_new_tokens: int | None = None, ignore_stop: bool = False) -> GenerationConfig:
        from edgevlm.models.tokenizer import generation_config

        return generation_config(self.tokenizer, self.config, max_new_tokens, stop=not ignore_stop)

    def generate(self, volume: Volume | np.ndarray, question: str | None = None, max_new_tokens: int | None = None,
                 collect_logits: bool = False, ignore_stop: bool = False) -> Result:
        """Text for one study. `ignore_stop`: always make max_new_tokens steps (benchmarks)."""
        from edgevlm.models.tokenizer import decode, encode_prompt, special_ids

        start = time.perf_counter()
        array = self.preprocess(volume)
        timings: dict[str, float] = {"preprocess": (time.perf_counter() - start) * 1000}
        question = question or self.config.prompt.default_question
        prompt_ids = encode_prompt(self.tokenizer, self.config, question)
        gen = self.generation_config(max_new_tokens, ignore_stop)
        logits: list[np.ndarray] | None = [] if collect_logits else None
        image_id = special_ids(self.tokenizer, self.config.prompt).image
        tokens = generate_ids(self.backend, self.table, array[:1], [prompt_ids], image_id, gen, timings, logits)[0]
        timings["total"] = (time.perf_counter() - start) * 1000
        text = decode(self.tokenizer, tokens, gen.stop_ids)
        return Result(text, tokens, question, timings, len(prompt_ids), self.backend_name, self.providers, logits)


def load_bundle(path: str | Path, backend: str = "ort", threads: int | None = None,
                providers: Sequence[str] | None = None, checkpoint: str | Path | None = None,
                verify: bool = True, quant: str | None = None, dtype: str = "fp32") -> Session:
    """Verify a bundle (manifest, versions, sha256 of every file) and load it on `backend`.

    backend "ort": the bundle's ONNX graphs (providers: TensorRT > CUDA > CPU where available, or
    `providers`). backend "torch": the source checkpoint (`checkpoint`, default the path recorded in
    the manifest), which must hash to the manifest's source sha256; `quant` (int8 | nf4, bitsandbytes)
    and `dtype` (fp32 | fp16 | bf16) apply to it (edgevlm.export.bnb).
    """
    from safetensors.numpy import load_file

    from edgevlm.models.tokenizer import decision_rules, load_tokenizer
    from edgevlm.preprocess import Recipe

    if backend not in BACKENDS:
        raise EdgeVLMError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "torch" and (quant is not None or dtype != "fp32"):
        raise EdgeVLMError("--quant and --dtype apply to --backend torch; an ort bundle's precision is fixed at "
                           "export (edgevlm export --precision)")
    start = time.perf_counter()
    bundle = verify_bundle(path, check_hashes=verify)
    m = bundle.manifest
    try:
        config = MedVLMConfig.from_dict(m["model"])
        recipe = Recipe.from_json(bundle.file(PREPROCESS_FILE).read_text())
        tokenizer = load_tokenizer(bundle.file(TOKENIZER_FILE).read_text())
        decision_rules(tokenizer, config.prompt)
        table = load_file(str(bundle.file(EMBEDDINGS_FILE)))["embed_tokens"]
    except EdgeVLMError:
        raise
    except Exception as e:  # a malformed member that still matches its hash: written by a broken exporter
        raise EdgeVLMError(f"bundle content is unreadable ({type(e).__name__}: {str(e)[:160]}); re-export it",
                           bundle.path) from None
    threads = threads or default_threads()
    if backend == "ort":
        d = config.decoder
        engine: Any = OrtBackend(bundle.file(VISION_FILE), bundle.file(DECODER_FILE), d.n_layers,
                                 (d.n_kv_heads, d.head_dim), d.vocab_size, m.get("precision", "fp32"), threads,
                                 list(providers) if providers else None,
                                 kv_in_place=bool(m.get("graphs", {}).get("decoder", {}).get("kv_in_place")))
    else:
        source = m.get("source", {})
        ckpt = Path(checkpoint) if checkpoint is not None else Path(source.get("path", ""))
        # Public checkpoints were read by an importer; its name is the source kind in the manifest.
        kind = source.get("kind")
        from_ = kind if kind not in (None, "edgevlm", "torch", "hf-dir") else None
        engine = torch_backend_from_checkpoint(ckpt, source.get("sha256"), threads, quant, dtype, from_)
    return Session(bundle, config, recipe, tokenizer, table, engine, (time.perf_counter() - start) * 1000)
