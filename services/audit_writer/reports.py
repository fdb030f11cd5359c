"""`routemesh audit summary` and `routemesh audit verify`: read the audit files line by
line (plain and gzip), never whole."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from routemesh.services.audit_writer.records import RecordProblem, check_record
from routemesh.services.audit_writer.store import list_files, read_lines

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 15m, 1h, 24h, 7d)")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def _when(record: dict[str, Any]) -> datetime | None:
    part = record.get("decision") or record.get("observation") or {}
    stamp = part.get("occurred_at")
    return datetime.fromisoformat(stamp) if isinstance(stamp, str) else None


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    array = np.asarray(values)
    return {f"p{q}": float(np.percentile(array, q)) for q in (50, 95, 99)}


@dataclass
class _Window:
    requests: int = 0
    decisions: int = 0
    observations: int = 0
    routes: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    models: Counter = field(default_factory=Counter)
    errors: int = 0
    non_2xx: int = 0
    escalations: int = 0
    decision_ms: list[float] = field(default_factory=list)
    upstream_ms: list[float] = field(default_factory=list)
    tokens: Counter = field(default_factory=Counter)

    def add(self, record: dict[str, Any]) -> None:
        if record.get("join") != "amendment":
            self.requests += 1
        decision = record.get("decision")
        if decision:
            self.decisions += 1
            self.routes[decision.get("route_id")] += 1
            self.reasons[decision.get("reason")] += 1
            self.models[decision.get("target_model")] += 1
            if isinstance(decision.get("decision_latency_ms"), int | float):
                self.decision_ms.append(decision["decision_latency_ms"])
        observation = record.get("observation")
        if observation:
            self.observations += 1
            if observation.get("error_class"):
                self.errors += 1
            status = observation.get("upstream_status")
            if status is None or not 200 <= status < 300:
                self.non_2xx += 1
            if len(observation.get("escalation_path") or ()) > 1:
                self.escalations += 1
            if isinstance(observation.get("duration_ms"), int | float):
                self.upstream_ms.append(observation["duration_ms"])
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                self.tokens[key] += observation.get(key) or 0

    def result(self) -> dict[str, Any]:
        def share(counter: Counter, total: int) -> dict[str, float]:
            return {str(k): v / total for k, v in counter.most_common()} if total else {}

        def rate(count: int, total: int) -> float | None:
            return count / total if total else None

        return {
            "requests": self.requests,
            "route_share": share(self.routes, self.decisions),
            "reason_share": share(self.reasons, self.decisions),
            "target_model_share": share(self.models, self.decisions),
            "low_confidence_rate": rate(self.reasons["low_confidence"], self.decisions),
            "embedding_error_rate": rate(self.reasons["embedding_error"], self.decisions),
            "error_rate": rate(self.errors, self.observations),
            "non_2xx_rate": rate(self.non_2xx, self.observations),
            "escalation_rate": rate(self.escalations, self.observations),
            "decision_latency_ms": _pcts(self.decision_ms),
            "upstream_latency_ms": _pcts(self.upstream_ms),
            "tokens": dict(self.tokens),
        }


def summarize(
    directory: Path, windows: dict[str, timedelta], since: timedelta | None, now: datetime
) -> dict[str, Any]:
    """Statistics per window, keyed by the window's label (as the user wrote it)."""
    spans = list(windows.values())
    horizon = max([*spans, since] if since else spans)
    earliest_day = (now - horizon).date().isoformat()
    stats = {label: (span, _Window()) for label, span in windows.items()}
    for file in list_files(directory):
        if file.day < earliest_day:
            continue
        for _, line in read_lines(file):
            try:
                record = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            when = _when(record)
            if when is None:
                continue
            age = now - when
            if since is not None and age > since:
                continue
            for span, window_stats in stats.values():
                if age <= span:
                    window_stats.add(record)
    return {label: window_stats.result() for label, (_, window_stats) in stats.items()}


@dataclass
class Problem:
    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def verify(directory: Path, limit: int = 50) -> tuple[int, list[Problem]]:
    """(records checked, problems): every line parses and is allow-listed, and no
    request_id has two records outside amendments."""
    seen: dict[str, tuple[Path, int]] = {}
    problems: list[Problem] = []
    checked = 0
    for file in list_files(directory):
        for number, line in read_lines(file):
            checked += 1
            try:
                record = msgspec.json.decode(line)
                check_record(record)
            except (msgspec.DecodeError, RecordProblem) as exc:
                problems.append(Problem(file.path, number, str(exc)))
            else:
                if record["join"] != "amendment":
                    first = seen.get(record["request_id"])
                    if first is not None:
                        problems.append(Problem(
                            file.path, number,
                            f"request_id {record['request_id']} already recorded at "
                            f"{first[0]}:{first[1]}",
                        ))
                    else:
                        seen[record["request_id"]] = (file.path, number)
            if len(problems) >= limit:
                return checked, problems
    return checked, problems


def now_utc() -> datetime:
    return datetime.now(UTC)
