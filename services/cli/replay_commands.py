"""`routemesh replay`, `replay verify`, `replay shadow`, `samples import` and `gate`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import typer
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from routemesh.contracts.events import utc_now
from routemesh.services.audit_writer.reports import parse_duration
from routemesh.services.cli.output import Strict, err, fail, report_skipped
from routemesh.services.replay_worker import gate as gating
from routemesh.services.replay_worker import receipt as receipts
from routemesh.services.replay_worker import shadow as shadows
from routemesh.services.replay_worker.cases import from_audit
from routemesh.services.replay_worker.receipt import Bands
from routemesh.services.replay_worker.render import summary_rows
from routemesh.services.replay_worker.replay import ReplayError
from routemesh.services.replay_worker.runner import Outcome, ReplaySpec, run
from routemesh.services.replay_worker.samples import import_samples, write_eval
from routemesh.services.router import ConfigError, load_config
from routemesh.services.runtime.files import (
    Skipped,
    open_private,
    pretty_json,
    write_atomically,
)
from routemesh.services.runtime.settings import ServiceSettings

replay_app = typer.Typer(help="What a config would have decided, next to baselines, with "
                              "a receipt.")
samples_app = typer.Typer(help="Reviewed samples.", no_args_is_help=True)

Existing = Annotated[Path | None, typer.Option(exists=True, help="A route config (YAML).")]
HISTORY = Path(".routemesh/replays")


DriftWarn = Annotated[float, typer.Option(
    min=0, help="A headline figure moving by more than this share of the last report's "
                "on the same input set warns.")]
DriftAlert = Annotated[float, typer.Option(min=0, help="... and by more than this alerts.")]


def _run(spec: ReplaySpec, history: Path, json_output: Path | None,
         markdown_output: Path | None, bands: Bands) -> Outcome:
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("replaying", total=None)
        try:
            outcome = run(spec, history=history, json_output=json_output,
                          markdown_output=markdown_output, bands=bands,
                          progress=lambda done, total: bar.update(task, completed=done,
                                                                  total=total))
        except ReplayError as exc:
            raise fail(str(exc)) from None
    history.mkdir(parents=True, exist_ok=True)
    report = outcome.report
    stamp = report.created_at.strftime("%Y%m%dT%H%M%S")
    write_atomically(history / f"{stamp}-{report.receipt.run_hash[:12]}.json",
                     pretty_json(report), durable=False)
    return outcome


def _print_summary(outcome: Outcome) -> None:
    report = outcome.report
    inputs = report.inputs
    table = Table(title=f"{inputs.name}: {len(report.cases)} of {inputs.cases_read} cases"
                  + (" (all)" if inputs.limit == 0 else f" (limit {inputs.limit})"))
    for column in ("system", "accuracy", "macro-F1", "agreement", "est. cost"):
        table.add_column(column, justify="left" if column == "system" else "right")
    for row in summary_rows(report):
        table.add_row(*row)
    Console().print(table)
    for d in report.deltas:
        print(f"{d.before} -> {d.after}: {d.route_changed} routes changed of {d.cases} "
              f"(fixed {sum(f.verdict == 'fixed' for f in d.flips)}, broken "
              f"{sum(f.verdict == 'broken' for f in d.flips)})")
    print(f"drift against the previous report: {report.drift.status}"
          + ("; DETERMINISTIC VIOLATION: the same inputs as that report gave another run "
             "hash" if report.drift.deterministic_violation else ""))
    print(f"run hash {report.receipt.run_hash}"
          + ("" if report.receipt.validation_passed
             else f"; validation FAILED: {'; '.join(report.receipt.problems)}"))
    if outcome.receipt is not None:
        print(f"receipt {outcome.receipt}")


def _include_text(outcome: Outcome, path: Path) -> None:
    """Ids and texts of the replayed cases, to a file the caller named: never into a
    report."""
    lines = []
    for case in outcome.cases:
        if case.request is not None:
            lines.append(json.dumps({"id": case.id, "text_sha256": case.text_sha256,
                                     "messages": case.request.messages},
                                    ensure_ascii=False))
    with open_private(path) as out:
        out.write("\n".join(lines) + "\n")


@replay_app.callback(invoke_without_command=True)
def replay(
    ctx: typer.Context,
    config: Existing = None,
    candidate: Existing = None,
    previous: Existing = None,
    dataset: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="Labelled JSONL (the eval format).")] = None,
    captures: Annotated[Path | None, typer.Option(
        exists=True, file_okay=False, help="Review captures (raw_local or redacted).")] = None,
    audit_dir: Annotated[Path | None, typer.Option(
        exists=True, file_okay=False,
        help="Audit files: the input (decisions only, no text) or, with --dataset or "
             "--captures, what was recorded for the same requests.")] = None,
    since: Annotated[str | None, typer.Option(help="Audit input: this far back, e.g. 24h.")
                     ] = None,
    limit: Annotated[int, typer.Option(
        help="At most this many cases, sampled by id; 0 means all.")] = 100,
    json_output: Annotated[Path | None, typer.Option(
        help="The full report as JSON (a receipt is written beside it).")] = None,
    markdown_output: Annotated[Path | None, typer.Option(help="The report as Markdown.")
                               ] = None,
    history: Annotated[Path, typer.Option(
        help="Earlier reports, for the drift section; this one is added.")] = HISTORY,
    include_text: Annotated[Path | None, typer.Option(
        help="Also write the replayed texts to this local file (never to a report).")
    ] = None,
    allow_remote_embeddings: Annotated[bool, typer.Option(
        help="Let an openai encoder outside this machine and private networks see the "
             "texts.")] = False,
    drift_warn: DriftWarn = 0.20,
    drift_alert: DriftAlert = 0.50,
    strict: Strict = False,
) -> None:
    """Replay a dataset, captures or an audit period through the config, a candidate, a
    previous config and the baselines."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        raise fail("give --config (and one of --dataset, --captures, --audit-dir)", 2)
    inputs = [(s, p) for s, p in (("dataset", dataset), ("captures", captures)) if p]
    if len(inputs) > 1:
        raise fail("give one of --dataset and --captures", 2)
    source: Literal["dataset", "captures", "audit"]
    if inputs:
        source, path = inputs[0]  # type: ignore[assignment]
    elif audit_dir is not None:
        source, path = "audit", audit_dir
    else:
        raise fail("give one of --dataset, --captures, --audit-dir", 2)
    try:
        cutoff = utc_now() - parse_duration(since) if since else None
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    if limit < 0:
        raise fail("--limit is a count (0 means all)", 2)
    spec = ReplaySpec(config=config, source=source, input=path, candidate=candidate,
                      previous=previous, since=cutoff,
                      audit_dir=audit_dir if source != "audit" else None, limit=limit,
                      allow_remote_embeddings=allow_remote_embeddings)
    outcome = _run(spec, history, json_output, markdown_output,
                   Bands(warn=drift_warn, alert=drift_alert))
    _print_summary(outcome)
    if include_text is not None:
        _include_text(outcome, include_text)
        print(f"texts written to {include_text} (local only)")
    report_skipped(outcome.report.inputs.skipped_lines, strict)


@replay_app.command("verify")
def verify(receipt: Annotated[Path, typer.Argument(exists=True, dir_okay=False)]) -> None:
    """Check a receipt: its outputs' bytes and the run hash recomputed from the report."""
    try:
        problems = receipts.verify(receipt)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise fail(f"{receipt.name}: not a receipt ({exc})") from None
    if problems:
        raise fail(f"{receipt.name} does not hold: " + "; ".join(problems))
    print(f"{receipt.name}: outputs and run hash verified")


@replay_app.command("shadow")
def shadow_report(
    since: Annotated[str, typer.Option(help="The window, ending now, e.g. 1h.")] = "1h",
    json_output: Annotated[Path | None, typer.Option()] = None,
    markdown_output: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Live decisions against the shadow config's, read from their topics
    (ROUTEMESH_KAFKA_*)."""
    try:
        start = utc_now() - parse_duration(since)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    settings = ServiceSettings()
    try:
        window = asyncio.run(shadows.read_window(settings, start))
    except (KafkaError, OSError) as exc:
        raise fail(f"cannot read the decision topics: {exc}") from None
    report = shadows.compare(window)
    if json_output:
        write_atomically(json_output, pretty_json(report))
    if markdown_output:
        write_atomically(markdown_output, shadows.render_markdown(report).encode())
    agreement = "-" if report.agreement is None else f"{report.agreement:.3f}"
    print(f"{report.pairs} requests with a live and a shadow decision; agreement "
          f"{agreement}")
    if report.accuracy_delta is not None:
        print(f"outcomes judge {report.judged}: live {report.live_accuracy:.3f}, shadow "
              f"{report.shadow_accuracy:.3f}")


@samples_app.command("import")
def samples_import(
    input: Annotated[Path, typer.Option("--input", exists=True, dir_okay=False,
                                        help="Reviewed samples, JSON lines.")],
    config: Annotated[Path, typer.Option(exists=True, help="The route config.")],
    output: Annotated[Path, typer.Option(help="Eval cases, JSON lines.")],
) -> None:
    """Reviewed, redacted samples into eval cases; quarantine the rest with a reason."""
    try:
        imported = import_samples(input, load_config(config))
    except (ConfigError, OSError) as exc:
        raise fail(str(exc)) from None
    write_eval(imported, output)
    print(f"{len(imported.rows)} samples exported to {output}")
    for item in imported.quarantined:
        err.print(f"quarantined line {item.line}"
                  + (f" ({item.id})" if item.id else "") + f": {item.reason}",
                  highlight=False)
    if imported.quarantined:
        raise fail(f"{len(imported.quarantined)} samples quarantined (not exported)")


def gate(
    config: Annotated[Path, typer.Option(exists=True, help="The new config.")],
    baseline: Annotated[Path, typer.Option(exists=True, help="The config it replaces.")],
    dataset: Annotated[Path, typer.Option(exists=True, dir_okay=False,
                                          help="Labelled, held-out JSONL.")],
    audit_dir: Annotated[Path | None, typer.Option(
        exists=True, file_okay=False, help="Audit files: recent traffic.")] = None,
    since: Annotated[str, typer.Option(help="Recent traffic: this far back.")] = "24h",
    tolerance: Annotated[float, typer.Option(
        help="How much held accuracy the new config may lose.")] = 0.01,
    out: Annotated[Path, typer.Option(help="Where the gate's files go.")] = Path("gate"),
    history: Annotated[Path, typer.Option(help="Earlier reports, for drift.")] = HISTORY,
    drift_warn: DriftWarn = 0.20,
    drift_alert: DriftAlert = 0.50,
    strict: Strict = False,
) -> None:
    """The change gate: replay, baselines, recent traffic, drift, receipt and rollback;
    exits 1 when the new config is worse than the old or than a baseline."""
    try:
        cutoff = utc_now() - parse_duration(since)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    spec = ReplaySpec(config=baseline, candidate=config, source="dataset", input=dataset,
                      limit=0)
    outcome = _run(spec, history, out / "replay.json", out / "replay.md",
                   Bands(warn=drift_warn, alert=drift_alert))
    report = outcome.report
    try:
        verdict = gating.verdict(report, tolerance)
    except ValueError as exc:
        raise fail(str(exc)) from None
    skipped = Skipped()
    audit = gating.audit_summary(from_audit(audit_dir, cutoff, skipped),
                                 outcome.configs.current, cutoff, skipped
                                 ) if audit_dir is not None else None
    result = gating.GateReport(verdict=verdict, rollback=gating.rollback_line(report),
                               replay=report, audit=audit)
    write_atomically(out / "gate.json", pretty_json(result))
    write_atomically(out / "gate.md",
                     gating.render_markdown(result, outcome.markdown).encode())
    _print_summary(outcome)
    print(result.rollback)
    print(f"wrote {out / 'gate.md'}, {out / 'gate.json'} and {outcome.receipt}")
    report_skipped(skipped.by_file(), strict)
    if not verdict.passed:
        raise fail("gate: " + "; ".join(verdict.reasons))
    print(f"gate passed: {verdict.new_accuracy:.3f} against {verdict.old_accuracy:.3f}")
