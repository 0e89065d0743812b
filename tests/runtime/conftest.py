from __future__ import annotations

from pathlib import Path

import pytest
from edgevlm.export.testing import tiny_bundle


@pytest.fixture(scope="session")
def bundles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One folder per test session: tests/export, tests/runtime and tests/cli share its bundles.
    return tmp_path_factory.getbasetemp() / "edgevlm-bundles"


@pytest.fixture(scope="session")
def gqa_bundle(bundles_dir: Path) -> tuple[Path, Path]:
    return tiny_bundle(bundles_dir, "gqa")
