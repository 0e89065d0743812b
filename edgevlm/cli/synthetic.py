"""`edgevlm studies make-synthetic`: write synthetic chest CT studies (DICOM + ground truth)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgevlm.cli import command, console
from edgevlm.cli.studies import studies_app


@command(studies_app, name="make-synthetic")
def make_synthetic_cmd(
    out: Path = typer.Option(
        ..., "-o", "--out", help="Folder to write <study_id>/dicom/*.dcm, ground_truth.json and studies.json into."
    ),
    n: int = typer.Option(20, "--n", min=0, help="Number of studies."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the first study; study i uses seed + i."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace study folders that already exist."),
) -> None:
    """Write synthetic chest CT studies with known findings, reports and questions (no real patient data).

    Example: edgevlm studies make-synthetic -o ./synthetic --n 20 --seed 0
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from edgevlm.data.dicom import make_synthetic

    with Progress(
        TextColumn("[bold]studies[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("", total=n)

        def advance(i: int, study_id: str) -> None:
            progress.update(task, advance=1, description=study_id)

        written = make_synthetic(out, n, seed, overwrite=overwrite, on_study=advance)
    normal = sum(1 for e in written if e["normal"])
    console.print(f"wrote {len(written)} studies ({normal} normal) to {out} (index: {out / 'studies.json'})")
