from __future__ import annotations

from pathlib import Path

import pytest
from edgevlm.export.testing import tiny_bundle


@pytest.fixture(scope="session")
def gqa_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # The folder tests/runtime and tests/cli use: one export per test session.
    return tiny_bundle(tmp_path_factory.getbasetemp() / "edgevlm-bundles", "gqa")
