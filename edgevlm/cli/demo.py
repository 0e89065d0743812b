"""`edgevlm demo`: the whole path on the embedded demo model, offline, in under a minute.

A synthetic chest CT is written as a real DICOM series, the shipped demo teacher is exported to an
ONNX bundle (once; cached and re-verified on every run), and the study goes through `infer` with the
per-stage profile. The generated report is shown beside the ground truth the phantom was drawn from.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import typer
from rich.columns import Columns
from rich.panel import Panel
from rich.table import Table

from edgevlm.cli import command, console, err_console
from edgevlm.errors import EdgeVLMError

DEMO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo-teacher.safetensors"


def cache_root() -> Path:
    """$EDGEVLM_CACHE, else $XDG_CACHE_HOME/edgevlm, else ~/.cache/edgevlm."""
    if os.environ.get("EDGEVLM_CACHE"):
        return Path(os.environ["EDGEVLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgevlm"


def demo_bundle(model: Path | None = None, cache: Path | None = None) -> Path:
    """The demo model's fp32 bundle, exported on first use into the cache (keyed by the model's hash)."""
    from edgevlm.checkpoint import file_sha256
    from edgevlm.export import export_bundle
    from edgevlm.runtime import verify_bundle

    model = model or DEMO_MODEL
    if not model.is_file():
        raise EdgeVLMError("the embedded demo model is missing from this installation; reinstall edgevlm", model)
    bundle = (cache or cache_root()) / f"demo-teacher-{file_sha256(model)[:12]}"
    if bundle.exists():
        try:
            verify_bundle(bundle)
            return bundle
        except EdgeVLMError as e:  # a damaged cache is rebuilt, and the user is told why
            err_console.print(f"cached demo bundle failed verification ({e}); exporting again")
    err_console.print(f"exporting the demo model to {bundle} (first run only) ...")
    return export_bundle(model, bundle, precision="fp32", overwrite=True,
                         on_step=lambda msg: err_console.print(f"  {msg}"))


@command(name="demo")
def demo(
    seed: int = typer.Option(1_000_007, "--seed", help="Synthetic study seed (held-out range: >= 1000000)."),
    prompt: str | None = typer.Option(None, "--prompt", help="Question; default: write the report."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for onnxruntime."),
    keep: Path | None = typer.Option(None, "--keep", help="Keep the synthetic study in this folder."),
) -> None:
    """Make a synthetic chest CT, export the demo model (cached), and run `infer --profile` on it.

    Example: edgevlm demo
    """
    from edgevlm.data import sample_study
    from edgevlm.data.dicom import write_study
    from edgevlm.eval import extract_findings
    from edgevlm.io import load_study
    from edgevlm.runtime import PeakMemory, load_bundle, stage_table

    bundle = demo_bundle()
    with tempfile.TemporaryDirectory(prefix="edgevlm-demo-") as tmp:
        study_dir = (keep or Path(tmp)) / f"study-{seed}"
        start = time.perf_counter()
        spec = sample_study(seed)
        write_study(spec, study_dir, overwrite=True)
        console.print(f"wrote a synthetic chest CT: {spec.n_slices} DICOM slices of {spec.rows}x{spec.cols}, "
                      f"{spec.slice_spacing_mm:g} mm apart ({time.perf_counter() - start:.1f} s)")
        ground_truth = json.loads((study_dir / "ground_truth.json").read_text())
        with PeakMemory() as memory:
            session = load_bundle(bundle, backend="ort", threads=threads)
            start = time.perf_counter()
            volume = load_study(study_dir / "dicom")
            read_ms = (time.perf_counter() - start) * 1000
            result = session.generate(volume, prompt)
    title = prompt or session.config.prompt.default_question
    if prompt is None:
        console.print(Columns([
            Panel(result.text, title="generated report", expand=True),
            Panel(ground_truth["report"].strip(), title="ground truth (phantom)", expand=True),
        ], equal=True, expand=True))
        findings = Table(title="findings", show_edge=False)
        findings.add_column("in the phantom")
        findings.add_column("read from the generated report")
        truth_rows = [_finding_text(f) for f in ground_truth["findings"]] or ["(normal)"]
        read = [_finding_text(f.to_dict(with_geometry=False)) for f in extract_findings(result.text)] or ["(normal)"]
        for i in range(max(len(truth_rows), len(read))):
            findings.add_row(truth_rows[i] if i < len(truth_rows) else "", read[i] if i < len(read) else "")
        console.print(findings)
    else:
        console.print(Panel(result.text, title=title))
    console.print(stage_table(result, session.load_ms, read_ms, memory))


def _finding_text(f: dict) -> str:
    parts = [f["type"].replace("_", " ")]
    for key in ("severity", "side", "lobe", "density"):
        if f.get(key) and not (key == "side" and f.get("lobe")):
            parts.append(str(f[key]))
    if f.get("size_mm"):
        parts.append(f"{f['size_mm']:g} mm")
    return " ".join(parts)
