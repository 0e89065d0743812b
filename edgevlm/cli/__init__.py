"""The `edgevlm` command line: a thin layer over the Python API.

Each command module registers its commands on `app` with `command(...)`, which turns an
`EdgeVLMError` into one red line and a non-zero exit. Typer's pretty exceptions stay off: they
print local variables, and locals can hold patient data.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from edgevlm import __version__
from edgevlm.errors import EdgeVLMError

app = typer.Typer(
    name="edgevlm",
    help="Run trained 3D medical vision-language models fast and fully offline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def fail(message: str, exit_code: int = 2) -> None:
    """Print one error line and exit; used for every user-caused error."""
    err_console.print(f"[bold red]edgevlm: error:[/] {message}", markup=True, soft_wrap=True)
    raise typer.Exit(exit_code)


def command(parent: typer.Typer = app, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`@app.command()` that reports `EdgeVLMError` as one line instead of a traceback."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kw: Any) -> Any:
            try:
                return fn(*args, **kw)
            except EdgeVLMError as e:
                fail(str(e).replace("\n", " "), e.exit_code)
            except KeyboardInterrupt:
                fail("interrupted", 130)

        return parent.command(**kwargs)(wrapped)

    return decorate


def _version(value: bool) -> None:
    if value:
        console.print(f"edgevlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """edgevlm: export, run and benchmark 3D medical VLMs offline."""


def _register() -> None:
    # Importing a module registers its commands; heavy imports stay inside the command bodies.
    from edgevlm.cli import (
        bench,  # noqa: F401
        demo,  # noqa: F401
        distill,  # noqa: F401
        export,  # noqa: F401
        infer,  # noqa: F401
        info,  # noqa: F401
        studies,  # noqa: F401
        synthetic,  # noqa: F401
        train,  # noqa: F401
    )


_register()


def main() -> None:
    try:
        app()
    except EdgeVLMError as e:  # raised outside a command body, e.g. in an option callback
        err_console.print(f"edgevlm: error: {e}")
        sys.exit(e.exit_code)
