"""`--studies` / `--calib` / `--data` values: a folder of studies, or `synthetic:N`. Parsed in one place."""

from __future__ import annotations

from pathlib import Path

from edgevlm.errors import EdgeVLMError


def parse_source(source: str, option: str = "--studies") -> int | Path:
    """N for `synthetic:N`, else the folder path (which must exist). Raises a one-line EdgeVLMError."""
    if source.startswith("synthetic:"):
        try:
            n = int(source.split(":", 1)[1])
        except ValueError:
            raise EdgeVLMError(f"{option} {source!r}: expected synthetic:N with N a number") from None
        if n <= 0:
            raise EdgeVLMError(f"{option} {source!r}: N must be positive")
        return n
    path = Path(source)
    if not path.is_dir():
        raise EdgeVLMError(f"{option} must be a folder of studies or synthetic:N", path)
    return path
