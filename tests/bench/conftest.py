from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from edgevlm.export.testing import tiny_bundle


@pytest.fixture(scope="session")
def gqa_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # The folder tests/runtime and tests/cli use: one export per test session.
    return tiny_bundle(tmp_path_factory.getbasetemp() / "edgevlm-bundles", "gqa")


@pytest.fixture(scope="session")
def benchmark_script() -> Callable[[str], ModuleType]:
    """Import a script of benchmarks/ (not a package) by name, e.g. benchmark_script("probe_encoder")."""
    root = Path(__file__).resolve().parents[2] / "benchmarks"

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
