"""The ``hepaseg`` command line: typer + rich, thin wiring only.

Each command parses its options and calls one library function of the matching
stage package; user errors (:class:`hepaseg.errors.HepasegError`) become a
one-line ``error: ...`` on stderr and exit status 1.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path  # noqa: F401
from typing import Annotated, Optional  # noqa: F401  (Optional: typer needs it on 3.11 for some types)

import typer
from rich.console import Console

from hepaseg import __version__
from hepaseg.errors import HepasegError

app = typer.Typer(
    name="hepaseg",
    help="Liver-tumour segmentation in abdominal CT: MFCNet (Pang et al., PAKDD 2020) and nine baselines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def user_errors(fn):
    """Turn HepasegError (and OSError on user paths) into a one-line error and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HepasegError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"hepaseg {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """hepaseg: prepare CT, train and compare networks, predict tumour masks and lesion reports."""


# --- io / data commands (prepare, sample) ---------------------------------------------------
# [cli:data]

# --- models commands (models) ---------------------------------------------------------------
# [cli:models]

# --- training commands (train) --------------------------------------------------------------
# [cli:training]

# --- evaluation commands (evaluate, compare) ------------------------------------------------
# [cli:evaluation]

# --- inference commands (predict, explain, export, benchmark) -------------------------------
# [cli:inference]

# --- demo -----------------------------------------------------------------------------------
# [cli:demo]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
