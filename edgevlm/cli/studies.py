"""`edgevlm studies ...`: look at and make studies."""

from __future__ import annotations

import typer

from edgevlm.cli import app

studies_app = typer.Typer(help="List the series in a folder, or make synthetic chest CT studies.", no_args_is_help=True)
app.add_typer(studies_app, name="studies")
