"""`edgevlm studies ...`: look at and make studies."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgevlm.cli import app, command, console

studies_app = typer.Typer(help="List the series in a folder, or make synthetic chest CT studies.", no_args_is_help=True)
app.add_typer(studies_app, name="studies")


@command(studies_app, name="ls")
def ls(
    folder: Path = typer.Argument(..., help="Folder of DICOM files (searched recursively) or one DICOM file."),
    as_json: bool = typer.Option(False, "--json", help="Print the series as JSON."),
) -> None:
    """List the series in a folder from their headers (no patient data shown).

    The series `edgevlm` would load by default is marked with *. Pick another with its id:
    load_study(folder, series=ID).

    Example: edgevlm studies ls ./study
    """
    from rich.table import Table

    from edgevlm.io import list_series
    from edgevlm.io.dicom import auto_choice_id

    infos = list_series(folder)
    chosen = auto_choice_id(infos)
    if as_json:
        console.print_json(json.dumps([dict(i.as_dict(), default=i.series_id == chosen) for i in infos]))
        return
    table = Table(show_edge=False, pad_edge=False)
    # Ids must stay whole (users copy them into --series); free text gives way on narrow terminals.
    for col in ("id", "mod", "slices", "size", "spacing mm z,y,x", "plane"):
        table.add_column(col, no_wrap=True)
    table.add_column("description", overflow="fold")
    table.add_column("note", overflow="fold")
    for i in infos:
        spacing = ",".join("?" if s is None else f"{s:.3g}" for s in i.spacing_mm)
        note = i.note or (f"{i.skipped} scout/localizer skipped" if i.skipped else "")
        mark = "*" if i.series_id == chosen else " "
        table.add_row(
            f"{mark}{i.series_id}", i.modality, str(i.slices), f"{i.rows}x{i.cols}", spacing,
            i.orientation, i.description, note,
        )
    console.print(table)
