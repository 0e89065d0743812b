"""Test setup for edgevlm.kernels.

Without CUDA, Triton kernels can only run in its CPU interpreter, which Triton selects when a kernel
is *defined* (decorated), from TRITON_INTERPRET. So set it here, before the test modules import
edgevlm.kernels, and re-define the kernels if some earlier test directory imported them already.
The variable stays set for the rest of the pytest process; that only matters to code that runs
Triton kernels on CPU tensors, which without the interpreter cannot run at all. With CUDA nothing is
set: the same tests then run the compiled kernels on the GPU.
Triton's own @jit helpers (tl.zeros, tl.cdiv, ...) keep the mode triton itself was imported in, so if
something imported triton before this file ran, the kernel tests skip and say how to run them.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    for name in ("edgevlm.kernels.sparse3d", "edgevlm.kernels.patch_embed", "edgevlm.kernels"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "HAS_TRITON", False):
            importlib.reload(module)


def _triton_unusable() -> str | None:
    """Why the Triton kernels cannot run in this process, or None."""
    try:
        import triton.language as tl
    except ImportError:
        return "triton is not installed (the reference paths are tested without it)"
    if torch.cuda.is_available():
        return None
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.zeros, InterpretedFunction):
        return (
            "triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1, so its CPU "
            "interpreter is off: run `TRITON_INTERPRET=1 pytest tests/kernels` (or tests/kernels first)"
        )
    return None


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def triton_device(device: torch.device) -> torch.device:
    """The device the Triton kernels run on here (CUDA, or the CPU interpreter); skips with the reason
    when they cannot run in this process."""
    reason = _triton_unusable()
    if reason:
        pytest.skip(reason)
    return device


@pytest.fixture
def seed() -> int:
    """Fresh random inputs every run; the seed is printed in failures so a failure can be replayed."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s
