"""The compute of a bundle on two backends with one small interface (duck-typed, no base class):

    encode(volume (B, 1, D, H, W) float32) -> visual tokens (B, M, dim) numpy
    reset_cache(batch, cache_len)          allocate (or reuse and zero) the static KV cache
    step(embeds, input_pos, rope_pos, key_valid) -> last-position logits (B, vocab) numpy float32
    sync()                                 wait for the device (timing)

`ort`: the bundle's ONNX graphs in onnxruntime. `torch`: the source checkpoint in PyTorch, running the
very `DecoderStep` module that was exported (in place, no clone). Both keep their cache between
steps; neither allocates per token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgevlm.errors import EdgeVLMError

# Preference order when the user names no provider: TensorRT, then CUDA, then CPU (always last, as the
# fallback for any node the accelerated providers do not take).
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def choose_providers(requested: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The providers to ask for: `requested` (checked against what this onnxruntime has) or the best."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise EdgeVLMError(f"onnxruntime provider(s) {', '.join(missing)} not available here "
                               f"(available: {', '.join(available)})")
        chosen = list(requested)
    else:
        chosen = [p for p in PROVIDER_PREFERENCE if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


# Bundle precisions whose decoder holds MatMulNBits / integer matmuls: those kernels repack their weights
# at load (MLAS block layout), so prepacking stays on for them (edgevlm.export.quantize.SCHEMES).
QUANTIZED_DECODERS = ("int8", "int4", "auto")


def session_options(threads: int | None) -> Any:
    """onnxruntime session options of the bundle's graphs: all graph optimizations, sequential, `threads`
    intra-op threads (None: onnxruntime's default)."""
    import onnxruntime as ort

    ort.disable_telemetry_events()  # Windows builds' ETW events; elsewhere edgevlm/__init__.py opts out
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle intra-op threads spin after each Run by default and take the cores from whatever the process
    # does next: the next study's preprocessing (torch) ran 2.5x slower after a generation (demo teacher,
    # 2 threads: 40-47 -> 18.5 ms) and got the blame in per-stage timings. Spinning inside a Run, between
    # ops, is kept: decode steps were as fast (174 vs 175 ms a report).
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return options


def numpy_dtype(precision: str) -> np.dtype:
    return np.dtype(np.float16 if precision == "fp16" else np.float32)


@dataclass
class OrtBackend:
    """onnxruntime over vision.onnx and decoder.onnx, with IO binding for the KV cache.

    Cache buffers are allocated once per (batch, cache_len) and bound with IO binding, so no step
    allocates and the caches never leave the device. `kv_in_place` (the export checked that each past
    cache is read by exactly one scatter and otherwise only by Shape): past_i and present_i are bound
    to the SAME buffer. onnxruntime's scatter kernels are registered MayInplace(0, 0) and copy
    data->output only when the buffers differ, so a step writes just its new positions. Otherwise two
    buffer sets ping-pong (read one, write the other) and the scatter copies the whole cache every
    step (14 MB per token for the 2-layer Phi-3-width benchmark model).
    """

    vision_path: Path
    decoder_path: Path
    n_layers: int
    cache_shape_tail: tuple[int, int]  # (n_kv_heads, head_dim)
    vocab_size: int
    precision: str = "fp32"
    threads: int | None = None
    providers: list[str] | None = None
    kv_in_place: bool = False
    name: str = "ort"
    _state: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        self.dtype = numpy_dtype(self.precision)
        options = session_options(self.threads)
        providers = choose_providers(self.providers)
        # fp32/fp16 decoder without weight prepacking: MLAS's prepacked SGEMM is slower for the M=1 products of
        # decode (measured at 1 thread, 1x3072 @ 3072x16384: 13.1 ms prepacked, 9.5 ms not, torch 10.3 ms)
        # and a prepacked copy doubles the weights' memory. The vision encoder (M = thousands) keeps it.
        decoder_options = session_options(self.threads)
        if self.precision not in QUANTIZED_DECODERS:
            decoder_options.add_session_config_entry("session.disable_prepacking", "1")
        try:
            self.vision = ort.InferenceSession(str(self.vision_path), options, providers=providers)
            self.decoder = ort.InferenceSession(str(self.decoder_path), decoder_options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types for a bad file
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise EdgeVLMError(f"onnxruntime cannot load the bundle's graphs ({detail}); the file is corrupt or "
                               "from an incompatible exporter: re-export the bundle", self.vision_path.parent) from None
        self.providers = self.decoder.get_providers()  # what onnxruntime actually registered
        self.device = "cuda" if self.providers[0] in _GPU_PROVIDERS else "cpu"
        self.past_names = [i.name for i in self.decoder.get_inputs()][4:]
        self.present_names = [o.name for o in self.decoder.get_outputs()][1:]

    def encode(self, volume: np.ndarray) -> np.ndarray:
        return self.vision.run(None, {"volume": np.ascontiguousarray(volume, dtype=self.dtype)})[0]

    def _ortvalue(self, array: np.ndarray) -> Any:
        import onnxruntime as ort

        # On the CPU the OrtValue wraps the numpy buffer (no copy); on CUDA it is a device copy.
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def reset_cache(self, batch: int, cache_len: int) -> None:
        shape = (batch, self.cache_shape_tail[0], cache_len, self.cache_shape_tail[1])
        if self._state.get("shape") != shape:
            # Two sets of 2 * n_layers buffers (ping-pong) and the logits buffer: allocated here only.
            n_sets = 1 if self.kv_in_place else 2
            host = [[np.zeros(shape, self.dtype) for _ in range(2 * self.n_layers)] for _ in range(n_sets)]
            self._state = {
                "shape": shape,
                "host": host,
                "sets": [[self._ortvalue(a) for a in bufs] for bufs in host],
                "logits_host": np.zeros((batch, self.vocab_size), self.dtype),
            }
            self._state["logits"] = self._ortvalue(self._state["logits_host"])
        elif self.device == "cpu":
            for bufs in self._state["host"]:
                for a in bufs:
                    a.fill(0)  # unwritten slots are masked anyway; zeros keep runs reproducible
        else:  # device buffers: rebuild from zeroed host arrays (once per generation, not per token)
            self._state["sets"] = [[self._ortvalue(np.zeros(shape, self.dtype)) for _ in bufs]
                                   for bufs in self._state["host"]]
        self._state["read"] = 0

    def step(self, embeds: np.ndarray, input_pos: np.ndarray, rope_pos: np.ndarray,
             key_valid: np.ndarray) -> np.ndarray:
        state = self._state
        sets = state["sets"]
        src, dst = (sets[0], sets[0]) if self.kv_in_place else (sets[state["read"]], sets[1 - state["read"]])
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("embeds", np.ascontiguousarray(embeds, dtype=self.dtype))
        binding.bind_cpu_input("input_pos", np.ascontiguousarray(input_pos, dtype=np.int64))
        binding.bind_cpu_input("rope_pos", np.ascontiguousarray(rope_pos, dtype=np.int64))
        binding.bind_cpu_input("key_valid", np.ascontiguousarray(key_valid, dtype=bool))
        for name, value in zip(self.past_names, src, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(self.present_names, dst, strict=True):
            binding.bind_ortvalue_output(name, value)
        if self.device == "cpu":
            binding.bind_ortvalue_output("logits", state["logits"])
        else:
            binding.bind_output("logits", "cpu")
        self.decoder.run_with_iobinding(binding)
        state["read"] = 1 - state["read"]
        if self.device == "cpu":
            return state["logits_host"].astype(np.float32)  # a copy: the buffer is rewritten next step
        return binding.copy_outputs_to_cpu()[0].astype(np.float32)

    def sync(self) -> None:
        pass  # run() returns when the outputs are ready


@dataclass
class TorchBackend:
    """A MedVLM in PyTorch eager, running the exported `DecoderStep` module in place."""

    model: Any  # edgevlm.models.MedVLM
    threads: int | None = None
    device: str = "cpu"
    name: str = "torch"
    dtype: Any = None  # torch dtype of the model's activations and cache; None: float32
    _state: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        import torch

        from edgevlm.export.graphs import DecoderStep

        if self.threads:
            torch.set_num_threads(int(self.threads))
        self.torch = torch
        self.dtype = self.dtype or torch.float32
        self.model = self.model.to(self.device).eval()
        self.step_module = DecoderStep(self.model, functional=False).eval()
        self.providers = [f"torch-{self.device}"]

    def encode(self, volume: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            dtype = next(self.model.vision.parameters()).dtype  # fp32 on CPU for 16-bit models (export/bnb.py)
            x = self.torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).to(self.device, dtype)
            return self.model.encode_image(x).float().cpu().numpy()

    def reset_cache(self, batch: int, cache_len: int) -> None:
        cfg = self.model.cfg.decoder
        shape = (batch, cfg.n_kv_heads, cache_len, cfg.head_dim)
        if self._state.get("shape") != shape:
            self._state = {"shape": shape, "cache": [self.torch.zeros(shape, device=self.device, dtype=self.dtype)
                                                     for _ in range(2 * cfg.n_layers)]}
        else:
            for t in self._state["cache"]:
                t.zero_()

    def step(self, embeds: np.ndarray, input_pos: np.ndarray, rope_pos: np.ndarray,
             key_valid: np.ndarray) -> np.ndarray:
        t = self.torch
        with t.no_grad():
            out = self.step_module(
                t.from_numpy(np.ascontiguousarray(embeds, dtype=np.float32)).to(self.device, self.dtype),
                t.from_numpy(np.ascontiguousarray(input_pos, dtype=np.int64)).to(self.device),
                t.from_numpy(np.ascontiguousarray(rope_pos, dtype=np.int64)).to(self.device),
                t.from_numpy(np.ascontiguousarray(key_valid, dtype=bool)).to(self.device),
                *self._state["cache"],
            )
            return out[0].float().cpu().numpy()

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()


def default_threads() -> int | None:
    """EDGEVLM_THREADS when set (benchmarks and shared machines pin it), else the library default."""
    value = os.environ.get("EDGEVLM_THREADS")
    return int(value) if value else None


def torch_backend_from_checkpoint(checkpoint: Path, expected_sha256: str | None, threads: int | None,
                                  quant: str | None = None, dtype: str = "fp32",
                                  from_: str | None = None) -> TorchBackend:
    """The bundle's source checkpoint on the torch backend; refused if it is not the exported one.

    `quant` (int8 | nf4, bitsandbytes) and `dtype` (fp32 | fp16 | bf16): edgevlm.export.bnb. `from_`:
    the importer of a public checkpoint (e.g. "m3d-lamed"), as recorded in the bundle's manifest."""
    from edgevlm.checkpoint import load_checkpoint, path_sha256

    if not Path(checkpoint).exists():
        raise EdgeVLMError("the torch backend needs the bundle's source checkpoint, which is not here; pass "
                           "--checkpoint FILE", checkpoint)
    if expected_sha256 and path_sha256(checkpoint) != expected_sha256:
        raise EdgeVLMError("checkpoint is not the one this bundle was exported from (sha256 differs); pass "
                           "the right --checkpoint", checkpoint)
    from edgevlm.export.bnb import quantize_torch_model, torch_dtype

    model = quantize_torch_model(load_checkpoint(checkpoint, from_=from_).model, quant, dtype)
    return TorchBackend(model, threads, dtype=torch_dtype(dtype))
