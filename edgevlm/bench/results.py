"""results.json: the versioned document every report is rendered from, and its atomic writes.

    {schema: "edgevlm-bench", schema_version, kind: "bench" | "compare", status, created_utc,
     edgevlm_version, runs: [machine, software, study set, settings, requirements, reference],
     configurations: [one per (run, bundle, backend): measurements, checks, verdict]}

The JSON Schema ships as edgevlm/bench/schema.json. A compare document has the same shape with
several runs, so one renderer serves both.
"""

from __future__ import annotations

import json
import math
import time
from importlib import resources
from pathlib import Path
from typing import Any

from edgevlm import __version__
from edgevlm.checkpoint import atomic_write
from edgevlm.errors import EdgeVLMError

SCHEMA = "edgevlm-bench"
SCHEMA_VERSION = 1
FILES = ("results.json", "report.md", "report.html")


def schema() -> dict[str, Any]:
    """The JSON Schema of results.json (validate with the `jsonschema` package, a dev dependency)."""
    return json.loads(resources.files("edgevlm.bench").joinpath("schema.json").read_text())


def new_document(kind: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "kind": kind, "status": "running",
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "edgevlm_version": __version__,
            "runs": runs, "configurations": []}


def public(doc: Any) -> Any:
    """The document without private keys (`_outputs`: token ids kept in memory for agreement only) and
    with NaN/inf as null (JSON has no NaN; a metric over zero items is "not measured")."""
    if isinstance(doc, float) and not math.isfinite(doc):
        return None
    if isinstance(doc, dict):
        return {k: public(v) for k, v in doc.items() if not k.startswith("_")}
    if isinstance(doc, list):
        return [public(v) for v in doc]
    return doc


def write_outputs(doc: dict[str, Any], out: Path) -> None:
    """results.json, report.md and report.html, each written atomically (readers never see half a file)."""
    from edgevlm.bench.report import render_html, render_markdown

    clean = public(doc)
    text = json.dumps(clean, indent=1, allow_nan=False)
    atomic_write(Path(out) / "results.json", lambda p: p.write_text(text))
    md = render_markdown(clean)
    atomic_write(Path(out) / "report.md", lambda p: p.write_text(md))
    html = render_html(clean)
    atomic_write(Path(out) / "report.html", lambda p: p.write_text(html))


def load_results(path: str | Path) -> dict[str, Any]:
    """A results.json (or a folder holding one), checked for schema name and version."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgeVLMError("no such results file", path) from None
    except ValueError as e:
        raise EdgeVLMError(f"not valid JSON ({e})", path) from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise EdgeVLMError("not an edgevlm bench results.json", path)
    if not isinstance(doc.get("schema_version"), int) or doc["schema_version"] > SCHEMA_VERSION:
        raise EdgeVLMError(f"results schema version {doc.get('schema_version')} is newer than this edgevlm reads "
                           f"({SCHEMA_VERSION}); upgrade edgevlm", path)
    return doc
