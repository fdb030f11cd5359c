"""`routemesh audit summary` and `routemesh audit verify`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from routemesh.services.audit_writer.reports import parse_duration, summarize, verify
from routemesh.services.cli.output import Strict, err, fail, figure, report_skipped

audit_app = typer.Typer(help="Audit trail: summaries and verification.", no_args_is_help=True)
DirOption = Annotated[Path, typer.Option("--dir", help="The audit directory.")]


@audit_app.command("summary")
def summary(
    directory: DirOption,
    since: Annotated[str | None, typer.Option(help="Only records newer than this (1h).")] = None,
    window: Annotated[str, typer.Option(help="Comma-separated windows.")] = "15m,1h,24h",
    format: Annotated[Literal["table", "json"], typer.Option(help="Output format.")] = "table",
    now: Annotated[str | None, typer.Option(
        help="Where the windows end (ISO 8601, UTC if no offset); default: the newest "
             "record's time, so an archived slice summarises the same on any day.")] = None,
    max_files: Annotated[int | None, typer.Option(
        min=0, help="Read at most the newest N audit files of each partition.")] = None,
    strict: Strict = False,
) -> None:
    """Per window: requests, route/reason/model shares, rates, latencies, tokens."""
    if not directory.is_dir():
        raise fail(f"{directory} is not a directory")
    try:
        windows = {w.strip(): parse_duration(w) for w in window.split(",") if w.strip()}
        since_delta = parse_duration(since) if since else None
        anchor = _instant(now) if now else None
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    report = summarize(directory, windows, since_delta, anchor, max_files)
    if format == "json":
        print(msgspec.json.format(msgspec.json.encode(report)).decode())
        report_skipped(report.skipped_lines, strict)
        return
    anchored = report.anchored_at.isoformat() if report.anchored_at else "no records"
    result = {label: msgspec.to_builtins(w) for label, w in report.windows.items()}
    table = Table(title=f"audit summary of {directory}, windows ending {anchored}")
    table.add_column("metric")
    for label in result:
        table.add_column(label, justify="right")
    scalar_keys = ["requests", "low_confidence_rate", "embedding_error_rate", "error_rate",
                   "non_2xx_rate", "escalation_rate"]
    for key in scalar_keys:
        table.add_row(key, *(figure(r[key]) for r in result.values()))
    for key in ("decision_latency_ms", "upstream_latency_ms"):
        for q in ("p50", "p95", "p99"):
            table.add_row(f"{key} {q}", *(figure(r[key][q]) for r in result.values()))
    for key in ("route_share", "reason_share", "target_model_share"):
        names = sorted({n for r in result.values() for n in r[key]})
        for name in names:
            table.add_row(f"{key}[{name}]", *(figure(r[key].get(name)) for r in result.values()))
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        table.add_row(name, *(figure(r["tokens"].get(name, 0)) for r in result.values()))
    Console().print(table)
    report_skipped(report.skipped_lines, strict)


def _instant(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--now: not an ISO 8601 time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@audit_app.command("verify")
def verify_command(directory: DirOption) -> None:
    """Check every line parses, holds allowed fields only, and no request_id repeats
    outside amendments. Exits 1 with the offending file and line."""
    if not directory.is_dir():
        raise fail(f"{directory} is not a directory")
    checked, problems = verify(directory)
    for problem in problems:
        err.print(str(problem), highlight=False)
    if problems:
        raise fail(f"{len(problems)} problem(s) in {checked} records checked")
    print(f"{checked} records verified in {directory}")
