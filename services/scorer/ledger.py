"""The scorer's state and its figures: decisions joined with their observations and
outcomes by request id, counted into hourly buckets by the decision's time, and read
back as rolling windows. Pure: no Kafka, no disk (``snapshot``/``restore`` give the
service what it saves).

Bounded whatever the traffic: a request waits for its outcome at most ``horizon`` (by
event time) and at most ``max_pending`` requests wait; buckets older than the longest
window are dropped; the advice evidence is counts on a 0.01 score grid; review
candidates are the newest ``max_candidates``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec

from routemesh.contracts import (
    LayerScore,
    ReviewCandidate,
    RouteScore,
    RouteScores,
    ThresholdRecommendation,
)
from routemesh.services.runtime.stats import percentile_of_counts
from routemesh.services.scorer import advice, candidates
from routemesh.services.scorer.views import (
    LedgerDecision,
    LedgerObservation,
    LedgerOutcome,
    fallback_right,
    feedback,
    final_right,
    semantic_of,
    top_right,
)

OTHER = "other"
_NO_TIME = datetime.min.replace(tzinfo=UTC)
# Decision latencies are counted in bins 2 % wide, from 1 µs: the p95 is read to 2 %.
_LATENCY_BASE_MS = 0.001
_LATENCY_GROWTH = math.log(1.02)


def _latency_bin(ms: float) -> int:
    return max(0, round(math.log(max(ms, _LATENCY_BASE_MS) / _LATENCY_BASE_MS)
                        / _LATENCY_GROWTH))


# A unified diff of the route YAML moving a route's threshold: (route id, threshold).
Patcher = Callable[[str, float], str]


def _p95(histogram: Mapping[int, int]) -> float | None:
    """The p95 of binned latencies (the mesh's nearest rank, read from the bins)."""
    index = percentile_of_counts(0.95, histogram)
    if index is None:
        return None
    return round(_LATENCY_BASE_MS * math.exp(index * _LATENCY_GROWTH), 3)


class Cell(msgspec.Struct, kw_only=True):
    """The counts of one route or layer (or all) in one hour."""

    decisions: int = 0
    # Outcomes joined; of them, those that say whether the route was right, and the right.
    outcomes: int = 0
    said: int = 0
    correct: int = 0
    quality_sum: float = 0.0
    quality_n: int = 0
    confidence_sum: float = 0.0
    confidence_n: int = 0
    latency: dict[int, int] = {}
    correct_routing: int = 0
    threshold_too_high: int = 0
    threshold_too_low: int = 0

    def add(self, other: Cell) -> None:
        for name in ("decisions", "outcomes", "said", "correct", "quality_sum", "quality_n",
                     "confidence_sum", "confidence_n", "correct_routing",
                     "threshold_too_high", "threshold_too_low"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for index, count in other.latency.items():
            self.latency[index] = self.latency.get(index, 0) + count


class Bucket(msgspec.Struct, kw_only=True):
    routes: dict[str, Cell] = {}
    layers: dict[str, Cell] = {}
    total: Cell = msgspec.field(default_factory=Cell)
    low_confidence: int = 0
    # Per top route, the threshold evidence (advice.sample_key -> count).
    advice: dict[str, dict[int, int]] = {}

    def add(self, other: Bucket) -> None:
        for mine, theirs in ((self.routes, other.routes), (self.layers, other.layers)):
            for name, cell in theirs.items():
                mine.setdefault(name, Cell()).add(cell)
        self.total.add(other.total)
        self.low_confidence += other.low_confidence
        for route, table in other.advice.items():
            into = self.advice.setdefault(route, {})
            for key, count in table.items():
                into[key] = into.get(key, 0) + count


class Entry(msgspec.Struct, kw_only=True, array_like=True):
    """One request waiting for the rest of its events. Once it has them all only the
    fact stays (``done``), so a duplicate outcome is still known as one."""

    decision: LedgerDecision | None = None
    observation: LedgerObservation | None = None
    outcome: LedgerOutcome | None = None
    # The first event's time (epoch seconds): the horizon counts from it.
    seen: float = 0.0
    scored: bool = False
    done: bool = False


class Counts(msgspec.Struct, kw_only=True):
    """What a saved ledger carries beside its buckets, joins and candidates."""

    newest: float = 0.0
    unmatched_outcomes: int = 0
    duplicate_outcomes: int = 0
    thresholds: dict[str, float] = {}
    default_route: str | None = None
    config_sha256: str | None = None


class Snapshot(Counts, kw_only=True):
    pending: list[tuple[str, Entry]] = []
    buckets: dict[int, Bucket] = {}
    candidates: list[ReviewCandidate] = []


@dataclass
class Changes:
    """What changed since the state was last saved: the keys a changelog rewrites."""

    hours: set[int] = field(default_factory=set)
    requests: set[str] = field(default_factory=set)
    candidates: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.hours or self.requests or self.candidates)

    def add(self, other: Changes) -> None:
        self.hours |= other.hours
        self.requests |= other.requests
        self.candidates |= other.candidates


@dataclass
class Limits:
    horizon: timedelta = timedelta(hours=72)
    max_pending: int = 200_000
    max_candidates: int = 5_000
    # The longest window asked for: older buckets are dropped.
    keep: timedelta = timedelta(hours=720)
    max_routes: int = 100
    candidate_policy: candidates.CandidatePolicy = field(
        default_factory=candidates.CandidatePolicy)


def candidate_time(candidate: ReviewCandidate) -> datetime:
    """The order candidates are kept in (the newest last); one without a time first."""
    return candidate.occurred_at or _NO_TIME


def _hour(at: datetime) -> int:
    return int(at.timestamp() // 3600)


class Ledger:
    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.pending: OrderedDict[str, Entry] = OrderedDict()
        self.buckets: dict[int, Bucket] = {}
        self.candidates: OrderedDict[str, ReviewCandidate] = OrderedDict()
        self.newest = 0.0
        self.unmatched_outcomes = 0
        self.duplicate_outcomes = 0
        # From the routing config when the service has one; else as decisions say.
        self.thresholds: dict[str, float] = {}
        self.default_route: str | None = None
        self.config_sha256: str | None = None
        self.known_routes: set[str] = set()
        self.changes = Changes()

    @classmethod
    def merged(cls, parts: Iterable[Ledger], limits: Limits) -> Ledger:
        """One ledger with the figures of ``parts`` (the ledgers of separate partitions)
        summed: what one ledger fed all their events would count. Not their pending
        joins; the newest ``max_candidates`` of their review candidates."""
        merged = cls(limits)
        found: list[ReviewCandidate] = []
        for part in parts:
            for hour, bucket in part.buckets.items():
                merged._bucket_at(hour).add(bucket)
            found.extend(part.candidates.values())
            merged.newest = max(merged.newest, part.newest)
            merged.unmatched_outcomes += part.unmatched_outcomes
            merged.duplicate_outcomes += part.duplicate_outcomes
            merged.known_routes |= part.known_routes
            merged.thresholds = {**part.thresholds, **merged.thresholds}
            merged.default_route = merged.default_route or part.default_route
            merged.config_sha256 = merged.config_sha256 or part.config_sha256
        found.sort(key=candidate_time)
        merged.candidates = OrderedDict(
            (c.request_id, c) for c in found[-limits.max_candidates:])
        merged.changes = Changes()
        return merged

    def take_changes(self) -> Changes:
        """What changed since the last call (``changes.add`` puts it back if the save
        failed)."""
        taken, self.changes = self.changes, Changes()
        return taken

    # -- configuration ------------------------------------------------------------------

    def configure(self, thresholds: Mapping[str, float], default_route: str,
                  config_sha256: str | None) -> None:
        self.thresholds = dict(thresholds)
        self.default_route = default_route
        self.config_sha256 = config_sha256
        self.known_routes |= set(thresholds)

    def _label(self, route: str) -> str:
        if route in self.known_routes:
            return route
        if len(self.known_routes) < self.limits.max_routes:
            self.known_routes.add(route)
            return route
        return OTHER

    # -- events -------------------------------------------------------------------------

    def _entry(self, request_id: str, at: datetime) -> Entry:
        entry = self.pending.get(request_id)
        if entry is None:
            entry = self.pending[request_id] = Entry(seen=at.timestamp())
        self.changes.requests.add(request_id)
        self.newest = max(self.newest, at.timestamp())
        return entry

    def add_decision(self, d: LedgerDecision) -> None:
        entry = self._entry(d.request_id, d.occurred_at)
        if entry.decision is not None or entry.done:
            return
        entry.decision = d
        semantic = semantic_of(d)
        if semantic is not None:
            self.thresholds.setdefault(semantic.top_route, semantic.threshold)
        if d.layer == "fallback" and self.default_route is None:
            self.default_route = d.route_id
        bucket = self._bucket(d.occurred_at)
        cells = (self._cell(bucket.routes, self._label(d.route_id)),
                 self._cell(bucket.layers, d.layer), bucket.total)
        latency = _latency_bin(d.decision_latency_ms)
        for cell in cells:
            cell.decisions += 1
            if d.score is not None:
                cell.confidence_sum += d.score
                cell.confidence_n += 1
            cell.latency[latency] = cell.latency.get(latency, 0) + 1
        bucket.low_confidence += d.reason == "low_confidence"
        self._joined(d.request_id, entry)

    def add_observation(self, o: LedgerObservation, at: datetime) -> None:
        entry = self._entry(o.request_id, at)
        if entry.observation is None and not entry.done:
            entry.observation = o
            self._joined(o.request_id, entry)

    def add_outcome(self, o: LedgerOutcome) -> None:
        entry = self._entry(o.request_id, o.occurred_at)
        if entry.outcome is not None or entry.done:
            self.duplicate_outcomes += 1
            return
        entry.outcome = o
        self._joined(o.request_id, entry)

    def _joined(self, request_id: str, entry: Entry) -> None:
        d = entry.decision
        if d is None:
            return
        if entry.outcome is not None and not entry.scored:
            entry.scored = True
            self._score(d, entry.outcome)
        found = candidates.candidate(d, entry.observation, entry.outcome,
                                     self.limits.candidate_policy)
        if found is not None:
            self.candidates[request_id] = found
            self.changes.candidates.add(request_id)
            while len(self.candidates) > self.limits.max_candidates:
                self.changes.candidates.add(self.candidates.popitem(last=False)[0])
        if entry.scored and entry.observation is not None:
            entry.decision = entry.observation = entry.outcome = None
            entry.done = True

    def _score(self, d: LedgerDecision, o: LedgerOutcome) -> None:
        bucket = self._bucket(d.occurred_at)
        right = final_right(d, o)
        classes = feedback(d, o)
        semantic = semantic_of(d)
        for cell in (self._cell(bucket.routes, self._label(d.route_id)),
                     self._cell(bucket.layers, d.layer), bucket.total):
            cell.outcomes += 1
            if right is not None:
                cell.said += 1
                cell.correct += right
            if o.quality_score is not None:
                cell.quality_sum += o.quality_score
                cell.quality_n += 1
            cell.correct_routing += "correct_routing" in classes
        if semantic is None or not semantic.movable:
            return
        top = self._label(semantic.top_route)
        top_cell = self._cell(bucket.routes, top)
        top_cell.threshold_too_high += "threshold_too_high" in classes
        top_cell.threshold_too_low += "threshold_too_low" in classes
        top_is_right = top_right(d, semantic, o)
        if top_is_right is None:
            return
        key = advice.sample_key(semantic.score, semantic.accepted, top_is_right,
                                fallback_right(d, semantic, o, self.default_route))
        table = bucket.advice.setdefault(top, {})
        table[key] = table.get(key, 0) + 1

    def _bucket(self, at: datetime) -> Bucket:
        return self._bucket_at(_hour(at))

    def _bucket_at(self, hour: int) -> Bucket:
        bucket = self.buckets.get(hour)
        if bucket is None:
            bucket = self.buckets[hour] = Bucket()
        self.changes.hours.add(hour)
        return bucket

    @staticmethod
    def _cell(cells: dict[str, Cell], name: str) -> Cell:
        cell = cells.get(name)
        if cell is None:
            cell = cells[name] = Cell()
        return cell

    # -- bounds -------------------------------------------------------------------------

    def expire(self, now: datetime) -> None:
        """Forget requests past the horizon (by the newest event time) or beyond the
        bound, and buckets older than the longest window."""
        oldest = self.newest - self.limits.horizon.total_seconds()
        while self.pending:
            entry = next(iter(self.pending.values()))
            if entry.seen >= oldest and len(self.pending) <= self.limits.max_pending:
                break
            self.changes.requests.add(self.pending.popitem(last=False)[0])
            if entry.decision is None and entry.outcome is not None:
                self.unmatched_outcomes += 1
        first_hour = _hour(now - self.limits.keep)
        for hour in [h for h in self.buckets if h < first_hour]:
            del self.buckets[hour]
            self.changes.hours.add(hour)

    # -- figures ------------------------------------------------------------------------

    def scores(self, now: datetime, window: timedelta,
               policy: advice.AdvicePolicy | None = None, candidate_limit: int = 100,
               cluster_limit: int = 50, patch: Patcher | None = None) -> RouteScores:
        # Whole hours: the current one and those before it, as many as the window holds.
        first_hour = _hour(now) - math.ceil(window.total_seconds() / 3600) + 1
        hours = [h for h in self.buckets if first_hour <= h <= _hour(now)]
        routes: dict[str, Cell] = {}
        layers: dict[str, Cell] = {}
        total = Cell()
        low_confidence = 0
        evidence: dict[str, list[dict[int, int]]] = {}
        for hour in hours:
            bucket = self.buckets[hour]
            for name, cell in bucket.routes.items():
                self._cell(routes, name).add(cell)
            for name, cell in bucket.layers.items():
                self._cell(layers, name).add(cell)
            total.add(bucket.total)
            low_confidence += bucket.low_confidence
            for route, table in bucket.advice.items():
                evidence.setdefault(route, []).append(table)
        window_start = datetime.fromtimestamp(first_hour * 3600, UTC)
        recent = [c for c in self.candidates.values()
                  if c.occurred_at is None or c.occurred_at >= window_start]
        return RouteScores(
            window_start=window_start, window_end=now, window_seconds=window.total_seconds(),
            config_sha256=self.config_sha256,
            routes=tuple(_route_score(name, cell, total.decisions)
                         for name, cell in sorted(routes.items())),
            layers=tuple(_layer_score(name, cell, total.decisions)
                         for name, cell in sorted(layers.items())),
            recommendations=self.recommendations(evidence, total.decisions, policy, patch),
            review_candidates=tuple(candidates.ranked(recent, candidate_limit)),
            review_clusters=tuple(candidates.clusters(recent, cluster_limit)),
            decisions=total.decisions, outcomes=total.outcomes, correct=total.correct,
            accuracy=_ratio(total.correct, total.said),
            low_confidence_rate=_ratio(low_confidence, total.decisions),
            p95_decision_latency_ms=_p95(total.latency),
        )

    def recommendations(self, evidence: Mapping[str, Iterable[Mapping[int, int]]],
                        decisions: int, policy: advice.AdvicePolicy | None,
                        patch: Patcher | None) -> tuple[ThresholdRecommendation, ...]:
        policy = policy or advice.AdvicePolicy()
        found = []
        for route, tables in sorted(evidence.items()):
            current = self.thresholds.get(route)
            if current is None:
                continue
            made = advice.advise(route, current, advice.merge(list(tables)), policy,
                                 decisions, patch)
            if made is not None:
                found.append(made)
        return tuple(found)

    # -- persistence --------------------------------------------------------------------

    def counts(self) -> Counts:
        return Counts(newest=self.newest, unmatched_outcomes=self.unmatched_outcomes,
                      duplicate_outcomes=self.duplicate_outcomes, thresholds=self.thresholds,
                      default_route=self.default_route, config_sha256=self.config_sha256)

    def take_counts(self, saved: Counts) -> None:
        """A saved ledger's counts; the routing config's thresholds, fallback route and
        digest, when the service has one, stay before the saved ones."""
        self.newest = saved.newest
        self.unmatched_outcomes = saved.unmatched_outcomes
        self.duplicate_outcomes = saved.duplicate_outcomes
        self.thresholds = {**saved.thresholds, **self.thresholds}
        self.default_route = self.default_route or saved.default_route
        self.config_sha256 = self.config_sha256 or saved.config_sha256

    def snapshot(self) -> Snapshot:
        return Snapshot(pending=list(self.pending.items()), buckets=self.buckets,
                        candidates=list(self.candidates.values()),
                        **msgspec.structs.asdict(self.counts()))

    def restore(self, snapshot: Snapshot) -> None:
        self.pending = OrderedDict(snapshot.pending)
        self.buckets = dict(snapshot.buckets)
        self.candidates = OrderedDict((c.request_id, c) for c in snapshot.candidates)
        self.take_counts(snapshot)
        for bucket in self.buckets.values():
            self.known_routes |= set(bucket.routes) - {OTHER}


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 6) if whole else None


def _mean(total: float, n: int) -> float | None:
    return round(total / n, 6) if n else None


def _route_score(name: str, cell: Cell, decisions: int) -> RouteScore:
    return RouteScore(
        route_id=name, decisions=cell.decisions, outcomes=cell.outcomes, correct=cell.correct,
        accuracy=_ratio(cell.correct, cell.said),
        mean_quality=_mean(cell.quality_sum, cell.quality_n),
        capture_rate=_ratio(cell.decisions, decisions),
        mean_confidence=_mean(cell.confidence_sum, cell.confidence_n),
        p95_decision_latency_ms=_p95(cell.latency),
        correct_routing=cell.correct_routing, threshold_too_high=cell.threshold_too_high,
        threshold_too_low=cell.threshold_too_low,
    )


def _layer_score(name: str, cell: Cell, decisions: int) -> LayerScore:
    return LayerScore(
        layer=name,  # type: ignore[arg-type]
        decisions=cell.decisions, outcomes=cell.outcomes, correct=cell.correct,
        accuracy=_ratio(cell.correct, cell.said), capture_rate=_ratio(cell.decisions, decisions),
        mean_confidence=_mean(cell.confidence_sum, cell.confidence_n),
        p95_decision_latency_ms=_p95(cell.latency),
    )
