"""`routemesh review candidates`, `routemesh review packet` and `routemesh tune`: the
scorer's judgements offline, from audit files, outcome files and labelled sets."""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import typer
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.table import Table

from routemesh.contracts import LayerScore, RouteScores
from routemesh.contracts.events import utc_now
from routemesh.services.audit_writer.reports import parse_duration, recent_records
from routemesh.services.cli.output import Strict, err, fail, figure, report_skipped
from routemesh.services.router import (
    ConfigError,
    DatasetError,
    RoutingConfig,
    build_dense_encoder,
    load_config,
    load_dataset,
)
from routemesh.services.runtime.captures import read_captures
from routemesh.services.runtime.files import (
    Skipped,
    numbered_rows,
    open_private,
    pretty_json,
    write_atomically,
)
from routemesh.services.runtime.settings import ServiceSettings
from routemesh.services.scorer import patch
from routemesh.services.scorer.advice import AdvicePolicy
from routemesh.services.scorer.candidates import CandidatePolicy
from routemesh.services.scorer.ledger import Ledger
from routemesh.services.scorer.review import (
    Request,
    ReviewAnswer,
    ReviewReport,
    read_answers,
    review,
    summarize_answers,
)
from routemesh.services.scorer.review import render_markdown as review_markdown
from routemesh.services.scorer.store import read_scorer_changelog, read_scorer_state
from routemesh.services.scorer.tune import TuneResult, tune
from routemesh.services.scorer.views import LedgerDecision, LedgerObservation, LedgerOutcome

review_app = typer.Typer(help="Requests a human should look at, by metadata only.",
                         no_args_is_help=True)

AuditDir = Annotated[Path, typer.Option("--dir", help="The audit directory.")]
OutcomeFiles = Annotated[list[Path] | None, typer.Option(
    "--outcomes", help="JSON lines of outcomes (OutcomeReported events, or /v1/outcomes "
    "bodies); may be given more than once.")]
PromptDir = Annotated[Path | None, typer.Option(
    "--prompt-dir", help="Review captures (raw_local, or redacted events as JSON lines): "
    "reports whether each candidate has local evidence, never its text.")]
Limit = Annotated[int, typer.Option(min=1, help="Candidates listed, largest clusters first.")]
MaxFiles = Annotated[int, typer.Option(
    min=1, help="Read at most the newest N audit files of each partition.")]
Since = Annotated[str | None, typer.Option(
    help="Only records this recent (24h, 7d), counted back from the newest.")]


class _OutcomeLine(msgspec.Struct, kw_only=True):
    request_id: str
    occurred_at: datetime | None = None
    correct_route: bool | None = None
    expected_route: str | None = None
    quality_score: float | None = None
    completion_time_s: float | None = None


def read_outcomes(paths: list[Path]) -> dict[str, LedgerOutcome]:
    """The first outcome of each request in the files (as the scorer keeps the first)."""
    decoder = msgspec.json.Decoder(_OutcomeLine)
    found: dict[str, LedgerOutcome] = {}
    now = utc_now()
    for path in paths:
        for _, row in numbered_rows(path, decoder, "not an outcome"):
            found.setdefault(row.request_id, LedgerOutcome(
                request_id=row.request_id, occurred_at=row.occurred_at or now,
                correct_route=row.correct_route, expected_route=row.expected_route,
                quality_score=row.quality_score, completion_time_s=row.completion_time_s))
    return found


class _WithId:
    """An audit record's part as the event it came from: its fields and the record's
    request id."""

    def __init__(self, part: object, request_id: str) -> None:
        self._part, self.request_id = part, request_id

    def __getattr__(self, name: str) -> object:
        return getattr(self._part, name)


def audit_requests(directory: Path, within: timedelta | None, max_files: int,
                   outcomes: dict[str, LedgerOutcome],
                   skipped: Skipped | None = None) -> Iterator[Request]:
    """Each request of the audit period with its outcome, decision and observation
    joined across records (an amendment completes an earlier one)."""
    recent = recent_records(directory, within, max_files=max_files, skipped=skipped)
    requests: OrderedDict[str, Request] = OrderedDict()
    for record, _ in recent.records:
        request = requests.setdefault(record.request_id, Request())
        if record.decision is not None and request.decision is None:
            request.decision = msgspec.convert(_WithId(record.decision, record.request_id),
                                               LedgerDecision, from_attributes=True)
        if record.observation is not None and request.observation is None:
            request.observation = msgspec.convert(
                _WithId(record.observation, record.request_id), LedgerObservation,
                from_attributes=True)
        if record.outcome is not None and request.outcome is None:
            request.outcome = msgspec.convert(_WithId(record.outcome, record.request_id),
                                              LedgerOutcome, from_attributes=True)
    for request_id, request in requests.items():
        # An outcome file given names what it holds; else the trail's own (the first).
        request.outcome = outcomes.get(request_id, request.outcome)
        yield request


def _report(directory: Path, outcomes: list[Path] | None, prompt_dir: Path | None,
            limit: int, max_files: int, since: str | None, policy: CandidatePolicy,
            include_text: bool = False) -> ReviewReport:
    if not directory.is_dir():
        raise fail(f"{directory} is not a directory")
    if prompt_dir is not None and not prompt_dir.is_dir():
        raise fail(f"{prompt_dir} is not a directory")
    skipped = Skipped()
    try:
        joined = read_outcomes(outcomes or [])
        captures = read_captures(prompt_dir, with_text=include_text,
                                 skipped=skipped) if prompt_dir else None
        if include_text and captures and any(c.mode != "raw_local" for c in captures.values()):
            raise fail(f"{prompt_dir} holds redacted captures: prompt text goes into a packet "
                       "only from a raw_local directory")
        within = parse_duration(since) if since else None
        report = review(audit_requests(directory, within, max_files, joined, skipped), policy,
                        limit, captures, utc_now(), include_text)
        return msgspec.structs.replace(report, skipped_lines=skipped.by_file())
    except (OSError, ValueError) as exc:
        raise fail(str(exc), 2) from None


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data, durable=False)


def _policy(near_threshold: float, near_margin: float, slow_ms: float) -> CandidatePolicy:
    return CandidatePolicy(threshold_band=near_threshold, margin_band=near_margin,
                           slow_ms=slow_ms)


NearThreshold = Annotated[float, typer.Option(help="|score - threshold| below this is near.")]
NearMargin = Annotated[float, typer.Option(help="|margin - required margin| below this is near.")]
SlowMs = Annotated[float, typer.Option(help="An answer slower than this (ms) is slow.")]


@review_app.command("candidates")
def candidates_command(
    directory: AuditDir,
    outcomes: OutcomeFiles = None,
    prompt_dir: PromptDir = None,
    limit: Limit = 100,
    max_files: MaxFiles = 31,
    since: Since = None,
    json_output: Annotated[Path | None, typer.Option(help="Write the full report (JSON).")]
    = None,
    markdown_output: Annotated[Path | None, typer.Option(help="Write it as Markdown.")] = None,
    near_threshold: NearThreshold = 0.05,
    near_margin: NearMargin = 0.02,
    slow_ms: SlowMs = 30_000.0,
    strict: Strict = False,
) -> None:
    """Review candidates of an audit period with every reason, in clusters of safe
    metadata, as the scorer picks them."""
    report = _report(directory, outcomes, prompt_dir, limit, max_files, since,
                     _policy(near_threshold, near_margin, slow_ms))
    if json_output is not None:
        _write(json_output, pretty_json(report))
    if markdown_output is not None:
        _write(markdown_output, review_markdown(report).encode())
    console = Console()
    console.print(f"{report.candidates} review candidates among {report.requests} requests "
                  f"({report.outcomes} with an outcome)", style="bold")
    table = Table(title="largest clusters")
    for column in ("size", "reason", "route", "top", "second", "match"):
        table.add_column(column)
    for c in report.clusters[:10]:
        match = f"{c.match_source}#{c.match_index}" if c.match_source else ""
        table.add_row(str(c.size), c.reason, c.route_id or "", c.top_route_id or "",
                      c.second_route_id or "", match)
    console.print(table)
    if report.learnable:
        print("labelled outcomes with captured text, per expected route (`routemesh learn "
              "--plan` says what learning them would gain): "
              + ", ".join(f"{route} {n}" for route, n in report.learnable.items()))
    report_skipped(report.skipped_lines, strict)


@review_app.command("packet")
def packet_command(
    directory: AuditDir,
    output: Annotated[Path, typer.Option(help="The packet file (JSON), a local path.")],
    outcomes: OutcomeFiles = None,
    prompt_dir: PromptDir = None,
    include_prompt_text: Annotated[bool, typer.Option(
        help="Put each candidate's captured text in the packet: only from a raw_local "
             "--prompt-dir, only into the local --output file.")] = False,
    limit: Limit = 100,
    max_files: MaxFiles = 31,
    since: Since = None,
    near_threshold: NearThreshold = 0.05,
    near_margin: NearMargin = 0.02,
    slow_ms: SlowMs = 30_000.0,
) -> None:
    """A metadata-only packet of review candidates for an outside reviewer."""
    if include_prompt_text and prompt_dir is None:
        raise fail("--include-prompt-text needs a raw_local --prompt-dir")
    if str(output) == "-" or "://" in str(output):
        raise fail("the packet goes to a local file: give a path, not stdout or a URL")
    report = _report(directory, outcomes, prompt_dir, limit, max_files, since,
                     _policy(near_threshold, near_margin, slow_ms), include_prompt_text)
    markdown = output.with_suffix(".md")
    if include_prompt_text:
        with open_private(output) as out:
            out.write(pretty_json(report).decode())
    else:
        _write(output, pretty_json(report))
    # The Markdown is metadata only either way: the text stays in the JSON packet.
    _write(markdown, review_markdown(report).encode())
    text = " with the captured prompt text (keep it local)" if include_prompt_text else \
        ", metadata only"
    err.print(f"wrote {len(report.rows)} candidates and {len(report.clusters)} clusters to "
              f"{output}{text}, and {markdown}", highlight=False)


@review_app.command("schema")
def schema_command() -> None:
    """The JSON Schema of one line of a reviewer's answer (`review summarize` reads it)."""
    print(msgspec.json.format(msgspec.json.encode(msgspec.json.schema(ReviewAnswer))).decode())


@review_app.command("summarize")
def summarize_command(
    result: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help=(
        "The reviewer's answer: JSON lines, one per candidate (`review schema`)."))],
    packet: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="The packet answered: routes per candidate, and "
        "what is missing.")] = None,
    json_output: Annotated[Path | None, typer.Option(help="Write the summary (JSON).")] = None,
) -> None:
    """Check an outside reviewer's answer against the schema and summarise it; a
    malformed answer is refused with the line that is wrong."""
    try:
        answers = read_answers(result)
    except ValueError as exc:
        raise fail(str(exc)) from None
    try:
        answered = msgspec.json.decode(packet.read_bytes(), type=ReviewReport) \
            if packet is not None else None
    except msgspec.DecodeError as exc:
        raise fail(f"{packet.name if packet else ''}: not a review packet ({exc})") from None
    summary = summarize_answers(answers, answered)
    if json_output is not None:
        _write(json_output, pretty_json(summary))
    table = Table(title=f"{summary.answers} answers")
    for column in ("route", "right_route", "wrong_route", "unsure"):
        table.add_column(column, justify="left" if column == "route" else "right")
    for route, verdicts in summary.by_route.items():
        table.add_row(route, *(str(verdicts.get(v, 0))
                               for v in ("right_route", "wrong_route", "unsure")))
    Console().print(table)
    for move, count in summary.suggested.items():
        print(f"suggested {move}: {count}")
    if summary.not_in_packet:
        err.print(f"[yellow]not in the packet:[/yellow] {', '.join(summary.not_in_packet)}",
                  highlight=False)
    if summary.unanswered:
        print(f"{summary.unanswered} candidates of the packet unanswered")


def _print_tune(result: TuneResult, diff: str) -> None:
    table = Table(title=f"routemesh tune (objective: {result.objective})")
    for column in ("split", "items", "accuracy before", "accuracy after", "cost before",
                   "cost after"):
        table.add_column(column, justify="right")
    for name, before, after in (("training", result.train_before, result.train_after),
                                ("held back", result.held_before, result.held_after)):
        table.add_row(name, str(before.items), f"{before.accuracy:.3f}",
                      f"{after.accuracy:.3f}", f"{before.cost:.6f}", f"{after.cost:.6f}")
    Console().print(table)
    if len(result.tried) > 1:
        scorings = Table(title="scorings tried (held back, current thresholds)")
        scorings.add_column("scoring")
        scorings.add_column("accuracy", justify="right")
        for name, figures in result.tried:
            scorings.add_row(name, f"{figures.accuracy:.3f}")
        Console().print(scorings)
    print(diff if diff else "no change proposed")


def tune_command(
    config: Annotated[Path, typer.Option("--config", help="Route config (YAML).")],
    dataset: Annotated[Path | None, typer.Option(
        help="Labelled JSONL: id, prompt|messages, route.")] = None,
    objective: Annotated[Literal["accuracy", "cost"], typer.Option(
        help="accuracy: the most accurate; cost: the cheapest route mix that keeps "
             "accuracy at or above --min-accuracy.")] = "accuracy",
    min_accuracy: Annotated[float | None, typer.Option(min=0, max=1)] = None,
    aggressive: Annotated[bool, typer.Option(
        help="Search every threshold on the grid (default: within 0.25 of the current "
             "one); with --from-scores, advice in steps of 0.10 up to three steps.")] = False,
    min_samples: Annotated[int | None, typer.Option(
        min=1, help="Evidence a route needs before its threshold moves: training items it "
                    "tops (default 10), or with --from-scores outcomes (default 50).")] = None,
    search_scoring: Annotated[bool, typer.Option(
        help="Also try the scorings (head, aggregation, dense weight).")] = False,
    output_tokens: Annotated[float, typer.Option(
        min=0, help="Answer length assumed per item for --objective cost.")] = 200.0,
    from_scores: Annotated[bool, typer.Option(
        help="Advise from the running scorer's saved evidence instead of a dataset.")] = False,
    state_dir: Annotated[Path, typer.Option(
        help="The scorer's state directory (ROUTEMESH_SCORER_STATE_DIR).")] = Path("scorer"),
    changelog: Annotated[bool, typer.Option(
        help="--from-scores: read the evidence from the scorer.changelog.v1 topic (scorers "
             "with ROUTEMESH_SCORER_STATE_STORE=changelog; Kafka from ROUTEMESH_KAFKA_*) "
             "instead of --state-dir.")] = False,
    window_h: Annotated[int, typer.Option(help="--from-scores: the window, hours.")] = 168,
    apply: Annotated[bool, typer.Option(
        help="Rewrite --config in place (the old file kept as .bak) when the held-back "
             "split does not get worse.")] = False,
) -> None:
    """Fit thresholds and margin on a training split and report the held-back split, or
    (--from-scores) turn the scorer's live evidence into the same advice. Dry run unless
    --apply; prints the YAML diff."""
    try:
        loaded = load_config(config)
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    if from_scores:
        _tune_from_scores(config, loaded.config, _evidence(state_dir, changelog), window_h,
                          aggressive, min_samples or 50, apply)
        return
    if dataset is None:
        raise fail("give --dataset (a labelled set) or --from-scores", 2)
    if objective == "cost" and min_accuracy is None:
        raise fail("--objective cost needs --min-accuracy", 2)
    try:
        items = load_dataset(dataset)
        encoder = build_dense_encoder(loaded.config.encoder)
    except (DatasetError, OSError) as exc:
        raise fail(str(exc), 2) from None
    result = tune(loaded, encoder, items, objective=objective, min_accuracy=min_accuracy,
                  aggressive=aggressive, search_scoring=search_scoring,
                  output_tokens=output_tokens, min_samples=min_samples or 10,
                  progress=lambda message: err.print(message, highlight=False))
    change = result.change
    _print_tune(result, patch.diff(config, change) if change else "")
    if not apply or not change:
        return
    if not result.safe:
        raise fail("not applied: the held-back split would get worse "
                   f"(accuracy {result.held_before.accuracy:.3f} -> "
                   f"{result.held_after.accuracy:.3f}, cost {result.held_before.cost:.6f} -> "
                   f"{result.held_after.cost:.6f})")
    backup = patch.apply(config, change)
    err.print(f"applied to {config}; the previous file is {backup}", highlight=False)


def _evidence(state_dir: Path, from_changelog: bool) -> Ledger:
    if from_changelog:
        try:
            return asyncio.run(read_scorer_changelog(ServiceSettings()))
        except (KafkaError, TimeoutError) as exc:
            raise fail(f"the scorer's changelog could not be read: {exc}") from None
    state = read_scorer_state(state_dir)
    if state is None:
        raise fail(f"no scorer state in {state_dir}: is the scorer running there?")
    ledger = Ledger()
    ledger.restore(state.ledger)
    return ledger


def _tune_from_scores(path: Path, config: RoutingConfig, ledger: Ledger, window_h: int,
                      aggressive: bool, min_samples: int, apply: bool) -> None:
    ledger.configure({r.id: r.threshold for r in config.routes}, config.default_route, None)
    scores = ledger.scores(utc_now(), timedelta(hours=window_h),
                           AdvicePolicy.of(aggressive, min_samples))
    table = Table(title=f"threshold advice over {window_h} h ({scores.outcomes} outcomes)")
    for column in ("route", "outcomes", "current", "advice", "accuracy change (95 % CI)"):
        table.add_column(column)
    for a in scores.recommendations:
        interval = "" if a.accuracy_change_low is None else (
            f"{a.accuracy_change:+.3f} ({a.accuracy_change_low:+.3f} to "
            f"{a.accuracy_change_high:+.3f})")
        table.add_row(a.route_id, str(a.samples), f"{a.current_threshold:.2f}",
                      f"{a.recommended_threshold:.2f}", interval)
    Console().print(table)
    moves = {a.route_id: a.recommended_threshold for a in scores.recommendations
             if a.recommended_threshold != a.current_threshold}
    if not moves:
        print(f"no change proposed (a route needs {min_samples} outcomes, and a move must "
              "make clearly more of them right)")
        return
    change = patch.ConfigChange(thresholds=moves)
    print(patch.diff(path, change))
    if apply:
        backup = patch.apply(path, change)
        err.print(f"applied to {path}; the previous file is {backup}", highlight=False)


scores_app = typer.Typer(help="The scorer's figures, offline.", no_args_is_help=True)


class LayerAttempts(msgspec.Struct, frozen=True, kw_only=True):
    """How often a cascade layer was tried and how often it decided."""

    layer: str
    attempts: int
    decided: int
    success_rate: float | None


class ScoresReport(msgspec.Struct, frozen=True, kw_only=True):
    anchored_at: datetime | None
    window_seconds: float
    scores: RouteScores
    attempts: tuple[LayerAttempts, ...]
    skipped_lines: dict[str, dict[str, int]] = {}


def scores_report(directory: Path, outcomes: list[Path] | None, window: timedelta,
                  max_files: int) -> ScoresReport:
    """The scorer's figures for the audit records of the window (and the outcomes given):
    the same ledger the service keeps, fed from files instead of Kafka, so a cascade can
    be judged without Kafka or Grafana."""
    ledger = Ledger()
    tried: Counter[str] = Counter()
    decided: Counter[str] = Counter()
    newest: datetime | None = None
    skipped = Skipped()
    for request in audit_requests(directory, window, max_files, read_outcomes(outcomes or []),
                                  skipped):
        d = request.decision
        if d is None:
            continue
        ledger.add_decision(d)
        newest = max(newest, d.occurred_at) if newest else d.occurred_at
        for attempt in d.attempts:
            tried[attempt.layer] += 1
            decided[attempt.layer] += attempt.decided
        if request.observation is not None:
            ledger.add_observation(request.observation, d.occurred_at)
        if request.outcome is not None:
            ledger.add_outcome(request.outcome)
    scores = ledger.scores(newest or utc_now(), window)
    return ScoresReport(
        anchored_at=newest, window_seconds=window.total_seconds(), scores=scores,
        attempts=tuple(LayerAttempts(layer=layer, attempts=n, decided=decided[layer],
                                     success_rate=round(decided[layer] / n, 6))
                       for layer, n in sorted(tried.items())),
        skipped_lines=skipped.by_file())


@scores_app.command("report")
def scores_report_command(
    directory: AuditDir,
    outcomes: OutcomeFiles = None,
    window: Annotated[str, typer.Option(help="This far back from the newest record.")
                      ] = "24h",
    layer: Annotated[str | None, typer.Option(help="Only this cascade layer.")] = None,
    format: Annotated[Literal["table", "json"], typer.Option(help="Output format.")
                      ] = "table",
    max_files: MaxFiles = 31,
    strict: Strict = False,
) -> None:
    """Per layer and per route: attempts, success rate, capture, accuracy and latency, from
    audit files and outcome files: the scorer's own figures for those events."""
    if not directory.is_dir():
        raise fail(f"{directory} is not a directory")
    try:
        report = scores_report(directory, outcomes, parse_duration(window), max_files)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    if layer is not None:
        report = msgspec.structs.replace(
            report, attempts=tuple(a for a in report.attempts if a.layer == layer),
            scores=msgspec.structs.replace(report.scores, layers=tuple(
                s for s in report.scores.layers if s.layer == layer)))
    if format == "json":
        print(pretty_json(report).decode(), end="")
        report_skipped(report.skipped_lines, strict)
        return
    s = report.scores
    console = Console()
    console.print(f"{s.decisions} decisions, {s.outcomes} outcomes, accuracy "
                  f"{figure(s.accuracy)} over {window} up to "
                  f"{report.anchored_at.isoformat() if report.anchored_at else 'no records'}",
                  style="bold")
    made: dict[str, LayerScore] = {x.layer: x for x in s.layers}
    layers = Table(title="layers")
    for column in ("layer", "attempts", "decided", "success", "capture", "outcomes",
                   "accuracy", "p95 ms"):
        layers.add_column(column, justify="left" if column == "layer" else "right")
    for a in report.attempts:
        x = made.get(a.layer)
        layers.add_row(a.layer, str(a.attempts), str(a.decided), figure(a.success_rate),
                       figure(x.capture_rate if x else None), str(x.outcomes if x else 0),
                       figure(x.accuracy if x else None),
                       figure(x.p95_decision_latency_ms if x else None))
    console.print(layers)
    routes = Table(title="routes")
    for column in ("route", "decisions", "capture", "outcomes", "accuracy", "confidence",
                   "p95 ms"):
        routes.add_column(column, justify="left" if column == "route" else "right")
    for r in s.routes:
        routes.add_row(r.route_id, str(r.decisions), figure(r.capture_rate), str(r.outcomes),
                       figure(r.accuracy), figure(r.mean_confidence),
                       figure(r.p95_decision_latency_ms))
    console.print(routes)
    report_skipped(report.skipped_lines, strict)
