"""What machine and software a benchmark ran on, and how inputs are named without leaking them.

Every result carries the environment (CPU, RAM, GPU, driver, OS, library versions, thread settings)
so a number can be traced to the machine that made it (DESIGN.md decision 9: every software and
hardware version listed). Paths never appear in clear: a study folder's name can hold a patient's
name, so paths are replaced by a short sha256 tag; bundle folders keep their base name (it is the
label reviewers read) beside the tag of the full path.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from edgevlm import __version__

LIBRARIES = ("numpy", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "tokenizers", "safetensors", "pydicom",
             "psutil", "nltk", "rouge-score", "typer", "rich", "nvidia-ml-py", "tensorrt", "triton", "bitsandbytes")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "EDGEVLM_THREADS",
              "OMP_WAIT_POLICY", "KMP_AFFINITY", "CUDA_VISIBLE_DEVICES")
# Options of `edgevlm bench` whose value is a path; `redact_argv` tags them.
PATH_OPTIONS = ("--bundle", "--studies", "-o", "--out", "--requirements", "--reference")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def path_tag(path: str | Path, keep_name: bool = False) -> str:
    """`path@<12 hex of sha256(absolute path)>`, or `name@<12 hex>` with keep_name (bundle folders)."""
    p = Path(path).expanduser().resolve()
    tag = sha256_text(str(p))[:12]
    return f"{p.name}@{tag}" if keep_name else f"path@{tag}"


def redact_argv(argv: Sequence[str]) -> str:
    """The command line with every path replaced by its tag; `synthetic:N` is kept (it is not a path)."""
    out: list[str] = []
    expect_path = False
    for arg in argv:
        if expect_path:
            keep = not arg.startswith("synthetic:") and out[-1] in ("--bundle", "--reference", "-o", "--out")
            out.append(arg if arg.startswith("synthetic:") else path_tag(arg, keep_name=keep))
            expect_path = False
            continue
        name, eq, value = arg.partition("=")
        if eq and name in PATH_OPTIONS:
            keep = name in ("--bundle", "--reference", "-o", "--out")
            out.append(f"{name}={value if value.startswith('synthetic:') else path_tag(value, keep_name=keep)}")
        elif arg in PATH_OPTIONS:
            out.append(arg)
            expect_path = True
        elif len(out) > 2 and not arg.startswith("-") and os.path.exists(arg):  # compare's positional files
            out.append(path_tag(arg, keep_name=False))
        else:
            out.append(arg)
    prog = Path(out[0]).name if out else "edgevlm"
    return shlex.join([prog if prog != "__main__.py" else "edgevlm", *out[1:]])


def _cpuinfo(keys: tuple[str, ...], cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The value of the first cpuinfo line starting with one of `keys`; None where there is none (not Linux)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(keys):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    # Not Linux: platform's answer is coarser but present.
    return _cpuinfo(("model name",)) or platform.processor() or platform.machine()


# Instruction sets that decide which quantized kernels a CPU runs (int8 GEMM with VNNI, bf16, AMX): the
# same int8 graph measured 0.97x fp32 on an AVX2-only machine and 1.76x on one with AVX512-VNNI.
_CPU_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd",
            "asimddp", "sve", "i8mm", "bf16")


def cpu_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU's flags among _CPU_ISA (x86 "flags", Arm "Features"; empty where cpuinfo cannot be read)."""
    present = set((_cpuinfo(("flags", "Features"), cpuinfo) or "").split())
    return [f for f in _CPU_ISA if f in present]


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _gpus() -> tuple[list[dict[str, Any]], str | None]:
    """GPUs from NVML (driver, CUDA driver, VRAM) or torch.cuda; ([], reason) when there is none."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # no nvidia-ml-py or no driver: report why, do not fail a CPU benchmark
        nvml_error = f"NVML unavailable ({type(e).__name__})"
    else:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                         "vram_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                         "driver": driver.decode() if isinstance(driver, bytes) else driver,
                         "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}", "source": "nvml"})
        return gpus, None
    try:
        import torch

        if torch.cuda.is_available():
            return [{"index": i, "name": torch.cuda.get_device_name(i),
                     "vram_bytes": int(torch.cuda.get_device_properties(i).total_memory), "driver": None,
                     "cuda_driver": None, "source": "torch.cuda"} for i in range(torch.cuda.device_count())], None
    except Exception as e:  # a broken CUDA install is a finding to report, not a crash
        return [], f"{nvml_error}; torch.cuda failed ({type(e).__name__})"
    return [], f"{nvml_error}; torch.cuda.is_available() is False"


def environment() -> dict[str, Any]:
    """The machine and software fingerprint (no hostname, user name or path)."""
    gpus, gpu_note = _gpus()
    try:
        import torch

        cudnn = torch.backends.cudnn.version() if torch.version.cuda else None
        torch_info = {"cuda": torch.version.cuda, "cudnn": cudnn,
                      "num_threads": torch.get_num_threads(), "num_interop_threads": torch.get_num_interop_threads()}
    except ImportError:
        torch_info = None
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        affinity = None
    freq = psutil.cpu_freq()
    return {
        "cpu": {"model": _cpu_model(), "architecture": platform.machine(), "logical_cores": os.cpu_count(),
                "physical_cores": psutil.cpu_count(logical=False), "usable_cores": affinity,
                "max_mhz": round(freq.max, 0) if freq and freq.max else None, "isa": cpu_isa()},
        "memory": {"total_bytes": int(psutil.virtual_memory().total)},
        "gpus": gpus,
        "gpu_note": gpu_note,
        "os": {"system": platform.system(), "release": platform.release(), "platform": platform.platform(),
               "libc": " ".join(platform.libc_ver()).strip() or None},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "edgevlm_version": __version__,
        "libraries": _versions(),
        "torch": torch_info,
        "onnxruntime_providers": providers,
        "thread_env": {k: os.environ.get(k) for k in THREAD_ENV},
        "load_average_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def machine_label(env: dict[str, Any]) -> str:
    """A short default name for the machine: CPU model and cores, plus the first GPU or "no GPU"."""
    cpu = env["cpu"]
    gpu = env["gpus"][0]["name"] if env["gpus"] else "no GPU"
    return f"{cpu['model']} ({cpu['usable_cores'] or cpu['logical_cores']} cores), {gpu}"
