"""Memory over a benchmark run: host RSS and GPU memory sampled on a timeline with phase marks.

`edgevlm.runtime.PeakMemory` gives one peak; a procurement review also wants to see when memory is
held (loading, the study, batched Offline runs), so this samples a timeline. GPU memory, where a GPU
is in use: torch's peak allocation (torch backend on CUDA) and NVML's memory used by this process
(any backend, onnxruntime's CUDA/TensorRT providers included), falling back to device-wide used
memory minus what was in use before loading when per-process accounting is not available.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

MAX_TIMELINE_POINTS = 400  # results.json stays small; the plot needs no more


@dataclass
class MemoryTimeline:
    interval_s: float = 0.05
    t_s: list[float] = field(default_factory=list)
    rss_bytes: list[int] = field(default_factory=list)
    gpu_bytes: list[int] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)
    gpu_source: str | None = None
    _gpu_baseline: int = 0
    _start: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _nvml: Any = field(default=None, repr=False)

    def start(self) -> MemoryTimeline:
        self._start = time.perf_counter()
        try:  # optional (gpu extra); without it GPU memory is simply not reported
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._gpu_baseline = int(pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used)
        except Exception:  # no library, no driver or no GPU: a CPU machine
            self._nvml = None
        self._thread = threading.Thread(target=self._run, name="edgevlm-bench-memory", daemon=True)
        self._thread.start()
        return self

    def mark(self, phase: str) -> None:
        self.phases.append({"name": phase, "t_s": round(time.perf_counter() - self._start, 3)})

    def _gpu_used(self) -> int | None:
        if self._nvml is None:
            return None
        import pynvml

        try:
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(self._nvml):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    self.gpu_source = "nvml (this process)"
                    return int(proc.usedGpuMemory)
        except pynvml.NVMLError:  # per-process accounting not permitted (containers): device-wide below
            pass
        self.gpu_source = "nvml (device used minus baseline before load)"
        return max(0, int(pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used) - self._gpu_baseline)

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.t_s.append(round(time.perf_counter() - self._start, 3))
            self.rss_bytes.append(int(proc.memory_info().rss))
            gpu = self._gpu_used()
            if gpu is not None:
                self.gpu_bytes.append(gpu)
            self._stop.wait(self.interval_s)

    def stop(self) -> dict[str, Any]:
        """Stop sampling; the memory record of results.json."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        max_rss = maxrss if sys.platform == "darwin" else maxrss * 1024  # Linux reports KiB
        torch_peak = _torch_cuda_peak()
        peak_vram = torch_peak if torch_peak is not None else (max(self.gpu_bytes) if self.gpu_bytes else None)
        step = max(1, len(self.t_s) // MAX_TIMELINE_POINTS)
        return {
            "peak_rss_bytes": max([*self.rss_bytes, 0]),
            "process_max_rss_bytes": max_rss,
            "peak_vram_bytes": peak_vram,
            "vram_source": "torch.cuda.max_memory_allocated" if torch_peak is not None else self.gpu_source,
            "timeline": {
                "interval_s": self.interval_s * step,
                "t_s": self.t_s[::step],
                "rss_bytes": self.rss_bytes[::step],
                "gpu_bytes": self.gpu_bytes[::step] if self.gpu_bytes else None,
                "phases": self.phases,
            },
        }


def _torch_cuda_peak() -> int | None:
    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())
