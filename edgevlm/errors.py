"""The one exception type users see.

Every error a user can cause (bad file, bad option, tampered bundle) is raised as `EdgeVLMError`
with a single line naming the file, the problem and the fix. The CLI prints it without a traceback
and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class EdgeVLMError(Exception):
    """A user-facing error: one line, names the evidence and what to do."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
