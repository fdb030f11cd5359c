"""`routemesh audit summary` and `routemesh audit verify`: read the audit files line by
line (plain and gzip), never whole."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import msgspec

from routemesh.services.audit_writer.records import AuditRecord, RecordProblem, read_record
from routemesh.services.audit_writer.store import AuditFile, list_files, read_lines
from routemesh.services.runtime.files import Skipped
from routemesh.services.runtime.stats import Percentiles

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 15m, 1h, 24h, 7d)")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def _when(record: AuditRecord) -> datetime:
    return record.filed_at


class WindowSummary(msgspec.Struct, frozen=True, kw_only=True):
    requests: int
    route_share: dict[str, float]
    reason_share: dict[str, float]
    target_model_share: dict[str, float]
    low_confidence_rate: float | None
    embedding_error_rate: float | None
    error_rate: float | None
    non_2xx_rate: float | None
    escalation_rate: float | None
    decision_latency_ms: Percentiles
    upstream_latency_ms: Percentiles
    tokens: dict[str, int]


class SummaryReport(msgspec.Struct, frozen=True, kw_only=True):
    # The instant every window ends at: the newest record's time unless one was given,
    # so the summary of an archived slice is the same whenever it is made.
    anchored_at: datetime | None
    files_read: int
    windows: dict[str, WindowSummary]
    # Lines that are no audit record: file name -> reason -> count.
    skipped_lines: dict[str, dict[str, int]] = {}


@dataclass
class _Window:
    requests: int = 0
    decisions: int = 0
    observations: int = 0
    routes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    models: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    non_2xx: int = 0
    escalations: int = 0
    decision_ms: list[float] = field(default_factory=list)
    upstream_ms: list[float] = field(default_factory=list)
    tokens: Counter[str] = field(default_factory=Counter)

    def add(self, record: AuditRecord) -> None:
        if record.primary:
            self.requests += 1
        decision = record.decision
        if decision is not None:
            self.decisions += 1
            self.routes[decision.route_id] += 1
            self.reasons[decision.reason] += 1
            self.models[decision.target_model] += 1
            self.decision_ms.append(decision.decision_latency_ms)
        observation = record.observation
        if observation is not None:
            self.observations += 1
            if observation.error_class:
                self.errors += 1
            status = observation.upstream_status
            if status is None or not 200 <= status < 300:
                self.non_2xx += 1
            if len(observation.escalation_path) > 1:
                self.escalations += 1
            self.upstream_ms.append(observation.duration_ms)
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                self.tokens[key] += getattr(observation, key) or 0

    def result(self) -> WindowSummary:
        def share(counter: Counter[str], total: int) -> dict[str, float]:
            return {str(k): v / total for k, v in counter.most_common()} if total else {}

        def rate(count: int, total: int) -> float | None:
            return count / total if total else None

        return WindowSummary(
            requests=self.requests,
            route_share=share(self.routes, self.decisions),
            reason_share=share(self.reasons, self.decisions),
            target_model_share=share(self.models, self.decisions),
            low_confidence_rate=rate(self.reasons["low_confidence"], self.decisions),
            embedding_error_rate=rate(self.reasons["embedding_error"], self.decisions),
            error_rate=rate(self.errors, self.observations),
            non_2xx_rate=rate(self.non_2xx, self.observations),
            escalation_rate=rate(self.escalations, self.observations),
            decision_latency_ms=Percentiles.of(self.decision_ms),
            upstream_latency_ms=Percentiles.of(self.upstream_ms),
            tokens=dict(self.tokens),
        )


def _records(files: list[AuditFile],
             skipped: Skipped | None = None) -> Iterator[tuple[AuditRecord, datetime]]:
    for file in files:
        for _, line in read_lines(file):
            try:
                record = read_record(line)
            except RecordProblem as problem:
                if skipped is not None:
                    skipped.add(file.path.name, problem.reason)
                continue
            yield record, _when(record)


def newest_record_time(files: list[AuditFile]) -> datetime | None:
    """The newest record's time, read from the newest day's files only."""
    if not files:
        return None
    newest_day = files[-1].day
    times = [when for _, when in _records([f for f in files if f.day == newest_day])]
    return max(times, default=None)


def newest_files(files: list[AuditFile], per_partition: int | None) -> list[AuditFile]:
    """The newest ``per_partition`` files of each partition (None: all), oldest first:
    bounded work that still reads every partition's newest records, where a cut of the
    newest files overall would read some partitions of a day and not others."""
    if per_partition is None:
        return files
    by_partition: dict[int, list[AuditFile]] = {}
    for file in files:
        by_partition.setdefault(file.partition, []).append(file)
    return sorted(f for group in by_partition.values()
                  for f in (group[-per_partition:] if per_partition > 0 else []))


@dataclass
class RecentRecords:
    # The instant ages are measured from: the newest record's time unless one was given.
    anchored_at: datetime | None
    files: list[AuditFile]
    # (record, its time), in file order (each day's file in the order it was written),
    # of age 0 to ``within``.
    records: Iterator[tuple[AuditRecord, datetime]]
    # The lines of those files that are no record, counted as ``records`` is read.
    skipped: Skipped = field(default_factory=Skipped)


def recent_records(
    directory: Path,
    within: timedelta | None,
    now: datetime | None = None,
    max_files: int | None = None,
    skipped: Skipped | None = None,
) -> RecentRecords:
    """The records of the last ``within`` (all of them if None) before ``now``, by default
    the newest record's time; ``max_files`` reads only the newest files of each partition
    (bounded work on a large directory). Lines that are no record are counted in
    ``skipped`` (the result's own when none is given) as the records are read."""
    files = newest_files(list_files(directory), max_files)
    anchor = now or newest_record_time(files)
    skipped = skipped if skipped is not None else Skipped()
    if anchor is None:
        return RecentRecords(None, [], iter(()), skipped)
    if within is not None:
        files = [f for f in files if f.day >= (anchor - within).date().isoformat()]

    def records() -> Iterator[tuple[AuditRecord, datetime]]:
        for record, when in _records(files, skipped):
            age = anchor - when
            if age >= timedelta(0) and (within is None or age <= within):
                yield record, when

    return RecentRecords(anchor, files, records(), skipped)


def summarize(
    directory: Path,
    windows: dict[str, timedelta],
    since: timedelta | None,
    now: datetime | None = None,
    max_files: int | None = None,
) -> SummaryReport:
    """Statistics per window, keyed by the window's label (as the user wrote it).

    Windows end at ``now``, by default the newest record's time; ``max_files`` reads only
    the newest files (bounded work on a large directory)."""
    # Nothing older than the longest window counts, nor anything older than ``since``.
    horizon = max(windows.values(), default=timedelta(0))
    recent = recent_records(directory, min(horizon, since) if since else horizon, now,
                            max_files)
    stats = {label: (span, _Window()) for label, span in windows.items()}
    for record, when in recent.records:
        assert recent.anchored_at is not None
        age = recent.anchored_at - when
        for span, window_stats in stats.values():
            if age <= span:
                window_stats.add(record)
    return SummaryReport(
        anchored_at=recent.anchored_at,
        files_read=len(recent.files),
        windows={label: window_stats.result() for label, (_, window_stats) in stats.items()},
        skipped_lines=recent.skipped.by_file(),
    )


@dataclass
class Problem:
    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def verify(directory: Path, limit: int = 50) -> tuple[int, list[Problem]]:
    """(records checked, problems): every line parses into an allow-listed record, no
    request_id has two primary records, and no event is in two records."""
    seen: dict[str, tuple[Path, int]] = {}
    events: dict[str, tuple[Path, int]] = {}
    problems: list[Problem] = []
    checked = 0
    for file in list_files(directory):
        for number, line in read_lines(file):
            checked += 1
            try:
                record = read_record(line)
            except RecordProblem as exc:
                problems.append(Problem(file.path, number, str(exc)))
            else:
                first = seen.get(record.request_id) if record.primary else None
                if first is not None:
                    problems.append(Problem(
                        file.path, number,
                        f"request_id {record.request_id} already recorded at "
                        f"{first[0]}:{first[1]}",
                    ))
                elif record.primary:
                    seen[record.request_id] = (file.path, number)
                again = [e for e in record.event_ids if e in events]
                if first is None and again:
                    where = events[again[0]]
                    problems.append(Problem(file.path, number, f"event {again[0]} already "
                                            f"recorded at {where[0]}:{where[1]}"))
                for event_id in record.event_ids:
                    events.setdefault(event_id, (file.path, number))
            if len(problems) >= limit:
                return checked, problems
    return checked, problems
