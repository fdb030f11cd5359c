"""`routemesh drift report`, `routemesh drift pin` and `routemesh drift unpin`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from routemesh.services.audit_writer.reports import parse_duration, recent_records
from routemesh.services.cli.output import Strict, err, fail, report_skipped
from routemesh.services.drift_detector import (
    Detector,
    DriftDecision,
    DriftObservation,
    Preset,
    Transition,
    Verdict,
    unserved_attempts,
)
from routemesh.services.drift_detector import store as drift_store
from routemesh.services.router import PASSTHROUGH_ROUTE, ConfigError, load_config

drift_app = typer.Typer(help="Drift verdicts: past periods from audit files, pinned "
                             "baselines for the running detector.", no_args_is_help=True)
StateDirOption = Annotated[Path, typer.Option(
    "--state-dir", help="The drift detector's state directory (ROUTEMESH_DRIFT_STATE_DIR).")]


class SubjectReport(msgspec.Struct, frozen=True, kw_only=True):
    scope: str
    subject: str
    verdict: Verdict


class DriftReport(msgspec.Struct, frozen=True, kw_only=True):
    preset: str
    anchored_at: datetime | None
    records: int
    transitions: tuple[Transition, ...]
    subjects: tuple[SubjectReport, ...]
    # Lines that are no audit record: file name -> reason -> count.
    skipped_lines: dict[str, dict[str, int]] = {}


def drift_report(directory: Path, detector: Detector, since: str | None) -> DriftReport:
    """Feed the audit records of the period to a detector, as the service feeds it
    events: every transition on the way, and each subject's verdict at the end."""
    recent = recent_records(directory, parse_duration(since) if since else None)
    transitions: list[Transition] = []
    count = 0
    for record, _ in recent.records:
        count += 1
        if record.decision is not None:
            transitions += detector.add_decision(
                msgspec.convert(record.decision, DriftDecision, from_attributes=True))
        if record.observation is not None:
            served = msgspec.convert(record.observation, DriftObservation,
                                     from_attributes=True)
            transitions += detector.add_observation(
                served, unserved_attempts(record.observation, served))
    subjects = []
    for scope in ("model", "route"):
        for subject in sorted(detector.state.subjects.get(scope, {})):
            verdict, _, _ = detector.verdict(scope, subject)
            subjects.append(SubjectReport(scope=scope, subject=subject, verdict=verdict))
    return DriftReport(preset=detector.preset, anchored_at=recent.anchored_at, records=count,
                       transitions=tuple(transitions), subjects=tuple(subjects),
                       skipped_lines=recent.skipped.by_file())


@drift_app.command("report")
def report(
    directory: Annotated[Path, typer.Option("--dir", help="The audit directory.")],
    preset: Annotated[Preset, typer.Option(help="Sensitivity: low, normal or high.")] = "normal",
    since: Annotated[str | None, typer.Option(
        help="Only records this recent (24h, 7d), counted back from the newest.")] = None,
    format: Annotated[Literal["table", "json"], typer.Option(help="Output format.")] = "table",
    window: Annotated[int, typer.Option(min=4, help="Observations per model window.")] = 20,
    routing_window: Annotated[int, typer.Option(
        min=20, help="Decisions per routing window.")] = 500,
    config: Annotated[Path | None, typer.Option(
        help="The routing config: its targets and routes are the known subjects, anything "
             "else is 'other' (as in the service).")] = None,
    threshold: Annotated[list[str] | None, typer.Option(
        help="NAME=VALUE: a signal's threshold instead of the preset's (repeatable), as "
             "ROUTEMESH_DRIFT_THRESHOLDS sets it for the service.")] = None,
    strict: Strict = False,
) -> None:
    """The drift verdicts of a past period, computed from audit files by the detector the
    service runs."""
    if not directory.is_dir():
        raise fail(f"{directory} is not a directory")
    overrides: dict[str, float] = {}
    for item in threshold or []:
        name, _, value = item.partition("=")
        try:
            overrides[name.strip()] = float(value)
        except ValueError:
            raise fail(f"--threshold {item!r}: give NAME=VALUE, e.g. error_rate=0.1",
                       2) from None
    try:
        detector = Detector(preset, window=window, routing_window=routing_window,
                            overrides=overrides)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    if config is not None:
        try:
            routes = load_config(config).config.routes
        except ConfigError as exc:
            raise fail(str(exc), 2) from None
        detector.known({r.target_model for r in routes}, {r.id for r in routes}
                       | {PASSTHROUGH_ROUTE})
    try:
        result = drift_report(directory, detector, since)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    if format == "json":
        print(msgspec.json.format(msgspec.json.encode(result)).decode())
        report_skipped(result.skipped_lines, strict)
        return
    console = Console()
    anchored = result.anchored_at.isoformat() if result.anchored_at else "no records"
    console.print(f"drift transitions in {directory}: {result.records} records up to "
                  f"{anchored}, preset {preset}", style="bold")
    for t in result.transitions:
        end = t.window_end.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if t.window_end else "-"
        cause = f" (likely cause: {t.likely_cause})" if t.likely_cause else ""
        console.print(f"{end}  {t.scope} {t.subject}: {t.previous} -> {t.verdict.state}: "
                      f"{t.verdict.reason}{cause}", highlight=False)
    now = Table(title="verdicts at the end of the period")
    for column in ("scope", "subject", "verdict", "samples", "reason"):
        now.add_column(column)
    for s in result.subjects:
        now.add_row(s.scope, s.subject, s.verdict.state, str(s.verdict.samples),
                    s.verdict.reason)
    console.print(now)
    report_skipped(result.skipped_lines, strict)


@drift_app.command("pin")
def pin(state_dir: StateDirOption = Path("drift")) -> None:
    """Pin the running detector's current routing windows as the baseline routing drift is
    measured against (instead of the preceding window), until `drift unpin`."""
    try:
        pinned = drift_store.pin(state_dir)
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None
    err.print(f"pinned {len(pinned.decisions)} decisions and {len(pinned.observations)} "
        f"observations as the routing baseline in {state_dir / drift_store.PIN_FILE}")


@drift_app.command("unpin")
def unpin(state_dir: StateDirOption = Path("drift")) -> None:
    """Compare routing with the preceding window again."""
    if drift_store.unpin(state_dir):
        err.print("unpinned: routing drift is measured against the preceding window")
    else:
        err.print(f"nothing was pinned in {state_dir}")
