"""`routemesh contracts export` and `routemesh contracts check`: the generated schemas on
disk (the contracts package only renders them)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from routemesh.contracts.schema_export import render
from routemesh.services.cli.output import fail

contracts_app = typer.Typer(help="Event schemas: export and drift check.", no_args_is_help=True)
SCHEMAS = Path("contracts/schemas")


def export(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in render().items():
        path = directory / name
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


def drift(directory: Path) -> list[str]:
    """Names of generated files that differ from (or are missing in) ``directory``, and
    files there that nothing generates."""
    expected = render()
    stale = [
        name
        for name, content in expected.items()
        if not (directory / name).is_file()
        or (directory / name).read_text(encoding="utf-8") != content
    ]
    extra = [
        p.name for p in directory.glob("*") if p.is_file() and p.name not in expected
    ] if directory.is_dir() else []
    return sorted(stale + extra)


@contracts_app.command("export")
def contracts_export(
    directory: Annotated[Path, typer.Argument(help="Where to write the schemas.")] = SCHEMAS,
) -> None:
    """Write one JSON Schema per event and asyncapi.yaml."""
    for path in export(directory):
        print(path)


@contracts_app.command("check")
def contracts_check(
    directory: Annotated[Path, typer.Argument(help="Checked-in schemas.")] = SCHEMAS,
) -> None:
    """Fail when the checked-in schemas differ from what the structs generate."""
    stale = drift(directory)
    if stale:
        raise fail(
            f"schemas in {directory} are out of date: {', '.join(stale)}; "
            "run `routemesh contracts export` and commit the result"
        )
    print(f"schemas in {directory} match the contracts")
