"""Joining decisions with observations by request id.

No Kafka, no writes: the service feeds events in, writes the records that come out, and
only then releases their offsets. An event waiting for its partner holds its offset.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from routemesh.contracts import CompletionObserved, Event, OutcomeReported, RouteDecided
from routemesh.contracts.events import utc_now
from routemesh.services.audit_writer.records import (
    DEFAULT_MAX_SKEW,
    AuditRecord,
    Join,
    build_record,
)
from routemesh.services.audit_writer.store import AuditStore, RequestState
from routemesh.services.runtime.consumer import OffsetTracker, PartitionKey, Position


@dataclass
class _Held:
    event: RouteDecided | CompletionObserved
    position: Position
    arrived: float
    received: datetime


@dataclass
class Output:
    record: AuditRecord
    # The Kafka partition of the request's events: whose files the record goes to.
    partition: int
    positions: list[Position] = field(default_factory=list)


@dataclass
class JoinStats:
    joined: int = 0
    decision_only: int = 0
    observation_only: int = 0
    amendment: int = 0
    outcome: int = 0
    dedup_hits: int = 0


class Joiner:
    def __init__(
        self,
        store: AuditStore,
        tracker: OffsetTracker,
        window_s: float,
        max_skew: timedelta = DEFAULT_MAX_SKEW,
    ) -> None:
        self.store = store
        self.tracker = tracker
        self.window_s = window_s
        self.max_skew = max_skew
        self.decisions: dict[str, _Held] = {}
        self.observations: dict[str, _Held] = {}
        self.stats = JoinStats()

    def add(
        self, event: Event, position: Position, now: float, received: datetime | None = None
    ) -> list[Output]:
        """``now`` is monotonic (the window), ``received`` the wall-clock time of arrival."""
        received = received or utc_now()
        if isinstance(event, RouteDecided):
            return self._arrive(event, position, now, received, "decision")
        if isinstance(event, CompletionObserved):
            return self._arrive(event, position, now, received, "observation")
        if isinstance(event, OutcomeReported):
            return self._outcome(event, position, received)
        return []

    def _outcome(self, event: OutcomeReported, position: Position, received: datetime
                 ) -> list[Output]:
        """An outcome is written at once, in a record of its own, once per event: the
        evidence trail holds what the caller learned next to what was decided."""
        state = self.store.state(event.request_id)
        if state is not None and str(event.event_id) in state.event_ids:
            self.stats.dedup_hits += 1
            return []
        return [self._emit("outcome", event.request_id, position[1], None, None, [],
                           received, amends=state, outcome=event)]

    def _arrive(
        self, event: RouteDecided | CompletionObserved, position: Position, now: float,
        received: datetime, side: str
    ) -> list[Output]:
        """One half of a pair arrived: skip it if seen, join it with a waiting partner,
        amend a record written without it, or hold it in the window."""
        is_decision = side == "decision"
        mine, partners = (
            (self.decisions, self.observations) if is_decision
            else (self.observations, self.decisions)
        )
        request_id = event.request_id
        state = self.store.state(request_id)
        already = state is not None and (
            (state.has_decision if is_decision else state.has_observation)
            or str(event.event_id) in state.event_ids
        )
        if already or request_id in mine:
            self.stats.dedup_hits += 1
            return []
        waiting = partners.pop(request_id, None)
        if waiting is not None:
            decision, observation = _split(event, waiting.event)
            return [self._emit("joined", request_id, position[1], decision, observation,
                               [waiting.position], waiting.received)]
        if state is not None and (state.has_observation if is_decision else state.has_decision):
            decision, observation = _split(event)
            return [self._emit("amendment", request_id, position[1], decision, observation,
                               [], received, amends=state)]
        mine[request_id] = _Held(event, position, now, received)
        self.tracker.hold(position)
        return []

    def expire(self, now: float) -> list[Output]:
        """Write out what waited longer than the window for its partner."""
        outputs = []
        cutoff = now - self.window_s
        for table in (self.decisions, self.observations):
            for request_id in [r for r, held in table.items() if held.arrived <= cutoff]:
                held = table.pop(request_id)
                decision, observation = _split(held.event)
                join: Join = "decision_only" if decision is not None else "observation_only"
                outputs.append(self._emit(join, request_id, held.position[1], decision,
                                          observation, [held.position], held.received))
        return outputs

    def drop_partitions(self, keys: Collection[PartitionKey]) -> None:
        for table in (self.decisions, self.observations):
            for request_id in [r for r, h in table.items() if h.position[:2] in keys]:
                del table[request_id]

    def _emit(
        self,
        join: Join,
        request_id: str,
        partition: int,
        decision: RouteDecided | None,
        observation: CompletionObserved | None,
        positions: list[Position],
        received: datetime,
        amends: RequestState | None = None,
        outcome: OutcomeReported | None = None,
    ) -> Output:
        reference = sorted(amends.event_ids)[0] if amends is not None and amends.event_ids else None
        record = build_record(join, request_id, decision, observation, outcome=outcome,
                              amends=reference, received_at=received,
                              max_skew=self.max_skew)
        self.store.mark(record, partition)
        setattr(self.stats, join, getattr(self.stats, join) + 1)
        return Output(record, partition, positions)


def _split(*events: RouteDecided | CompletionObserved
           ) -> tuple[RouteDecided | None, CompletionObserved | None]:
    """A request's decision and observation among ``events`` (either may be missing)."""
    decision = next((e for e in events if isinstance(e, RouteDecided)), None)
    observation = next((e for e in events if isinstance(e, CompletionObserved)), None)
    return decision, observation
