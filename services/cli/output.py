"""What every `routemesh` command uses to report an error: a red line on stderr and an
exit code, never a traceback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import typer
from rich.console import Console

from routemesh.services.runtime.files import reasons_text

err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def figure(value: object) -> str:
    """A table cell: ``-`` for nothing, a float to 3 decimals, anything else as it is."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


Strict = Annotated[bool, typer.Option(
    help="Exit 1 when a line of the files read could not be read (it is always counted "
         "and reported).")]


def report_skipped(skipped: Mapping[str, Mapping[str, int]], strict: bool) -> None:
    """Say which lines a reader passed over, by file and reason; under ``--strict`` that
    fails the command (after its outputs are written, so they can be looked at)."""
    if not skipped:
        return
    total = sum(n for reasons in skipped.values() for n in reasons.values())
    for file, reasons in skipped.items():
        err.print(f"[yellow]skipped[/yellow] in {file}: {reasons_text(reasons)}",
                  highlight=False)
    if strict:
        raise fail(f"{total} unreadable line(s) skipped (--strict)")
