"""Peak memory sampling and the per-stage profile table (reused by `infer --profile` and `demo`)."""

from __future__ import annotations

import resource
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import psutil
from rich.table import Table


@dataclass
class PeakMemory:
    """Context manager: peak process RSS while the block runs, sampled by a background thread.

    Sampling (every `interval_s`) catches the transient peak of a stage, which the RSS after the run
    does not show; ru_maxrss (the whole process lifetime peak) is kept beside it for reference.
    GPU: torch's peak allocation when torch uses CUDA; else NVML's device-wide used memory, if present.
    """

    interval_s: float = 0.005
    peak_rss_bytes: int = 0
    process_max_rss_bytes: int = 0
    gpu_peak_bytes: int | None = None
    gpu_source: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak_rss_bytes = max(self.peak_rss_bytes, proc.memory_info().rss)
            self._poll_nvml()
            self._stop.wait(self.interval_s)

    def _poll_nvml(self) -> None:
        handle = getattr(self, "_nvml_handle", None)
        if handle is not None:
            import pynvml

            used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            self.gpu_peak_bytes = max(self.gpu_peak_bytes or 0, used)

    def __enter__(self) -> PeakMemory:
        self._torch_cuda = _torch_cuda_in_use()
        if self._torch_cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            try:  # optional (gpu extra): device-wide memory, for onnxruntime's CUDA/TensorRT providers
                import pynvml

                pynvml.nvmlInit()
                self._nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(0)
                self.gpu_source = "nvml (device-wide used)"
            except Exception:  # no NVML library or no GPU: GPU memory is simply not reported
                self._nvml_handle = None
        self.peak_rss_bytes = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._sample, name="edgevlm-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss_bytes = max(self.peak_rss_bytes, psutil.Process().memory_info().rss)
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.process_max_rss_bytes = maxrss if sys.platform == "darwin" else maxrss * 1024  # Linux: KiB
        if self._torch_cuda:
            import torch

            self.gpu_peak_bytes = int(torch.cuda.max_memory_allocated())
            self.gpu_source = "torch.cuda.max_memory_allocated"

    def to_dict(self) -> dict[str, Any]:
        return {"peak_rss_bytes": self.peak_rss_bytes, "process_max_rss_bytes": self.process_max_rss_bytes,
                "gpu_peak_bytes": self.gpu_peak_bytes, "gpu_source": self.gpu_source}


def _torch_cuda_in_use() -> bool:
    torch = sys.modules.get("torch")  # only if already imported: never import torch just to ask
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def stage_rows(result: Any, load_ms: float | None = None, read_ms: float | None = None,
               memory: PeakMemory | None = None) -> list[tuple[str, str, str]]:
    """(stage, time, note) rows: load, read study, preprocess, vision, prefill (TTFT), decode, total, memory."""
    t = result.timings_ms
    ttft_ms = t["preprocess"] + t["vision"] + t["prefill"]
    rows = []
    if load_ms is not None:
        rows.append(("load", f"{load_ms:,.1f} ms", "verify bundle (sha256) + create sessions"))
    if read_ms is not None:
        rows.append(("read study", f"{read_ms:,.1f} ms", "DICOM / NIfTI to Volume"))
    rows += [
        ("preprocess", f"{t['preprocess']:,.1f} ms", "recipe: orient, intensity, resample, fit"),
        ("vision", f"{t['vision']:,.1f} ms", "encoder + projector"),
        ("prefill", f"{t['prefill']:,.1f} ms", f"{result.n_prompt_tokens} prompt tokens; time to first token "
                                               f"{ttft_ms:,.1f} ms"),
    ]
    per = result.decode_ms_per_token
    rate = result.decode_tokens_per_s
    note = f"{per:,.2f} ms/token, {rate:,.1f} tokens/s" if per else "no decode step"
    rows.append(("decode", f"{t['decode']:,.1f} ms", f"{result.n_new_tokens} new tokens; {note}"))
    rows.append(("total", f"{t['total']:,.1f} ms", "preprocess to last token (load excluded)"))
    if memory is not None:
        rows.append(("peak RSS", _mib(memory.peak_rss_bytes), "process, sampled during the run"))
        if memory.gpu_peak_bytes is not None:
            rows.append(("peak GPU", _mib(memory.gpu_peak_bytes), memory.gpu_source or ""))
    return rows


def stage_table(result: Any, load_ms: float | None = None, read_ms: float | None = None,
                memory: PeakMemory | None = None, title: str | None = None) -> Table:
    """A rich Table of `stage_rows`; `title` defaults to the backend and its providers."""
    table = Table(title=title or f"{result.backend} ({', '.join(result.providers)})", show_edge=False)
    table.add_column("stage")
    table.add_column("time", justify="right")
    table.add_column("")
    for row in stage_rows(result, load_ms, read_ms, memory):
        table.add_row(*row)
    return table
