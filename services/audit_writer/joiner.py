"""Joining decisions with observations, and which offsets are safe to commit.

Pure: no Kafka, no files. The service feeds events in, writes the records that come
out, and only then releases their offsets.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from routemesh.contracts import CompletionObserved, Event, RouteDecided
from routemesh.services.audit_writer.records import Join, build_record
from routemesh.services.audit_writer.store import AuditStore

# (topic, partition, offset)
Position = tuple[str, int, int]


class OffsetTracker:
    """Per partition: the next offset to consume and the offsets still held (in the
    join window). The safe commit is the oldest held offset, else the next one."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, int], int] = {}
        self._held: dict[tuple[str, int], list[int]] = defaultdict(list)
        self._released: dict[tuple[str, int], set[int]] = defaultdict(set)
        self._committed: dict[tuple[str, int], int] = {}

    def consumed(self, position: Position) -> None:
        topic, partition, offset = position
        key = (topic, partition)
        self._next[key] = max(self._next.get(key, 0), offset + 1)

    def hold(self, position: Position) -> None:
        heapq.heappush(self._held[position[:2]], position[2])

    def release(self, position: Position) -> None:
        self._released[position[:2]].add(position[2])

    def held_count(self) -> int:
        return sum(len(h) - len(self._released[k]) for k, h in self._held.items())

    def _oldest_held(self, key: tuple[str, int]) -> int | None:
        heap, released = self._held[key], self._released[key]
        while heap and heap[0] in released:
            released.discard(heapq.heappop(heap))
        return heap[0] if heap else None

    def to_commit(self) -> dict[tuple[str, int], int]:
        """Offsets that moved since the last call."""
        moved = {}
        for key, next_offset in self._next.items():
            oldest = self._oldest_held(key)
            safe = next_offset if oldest is None else oldest
            if self._committed.get(key) != safe:
                moved[key] = safe
        return moved

    def committed(self, offsets: dict[tuple[str, int], int]) -> None:
        self._committed.update(offsets)

    def forget(self, keys: set[tuple[str, int]]) -> None:
        """A partition went to another consumer: it redelivers what we held."""
        for key in keys:
            for table in (self._next, self._held, self._released, self._committed):
                table.pop(key, None)


@dataclass
class _Held:
    event: Event
    position: Position
    arrived: float


@dataclass
class Output:
    record: dict[str, Any]
    positions: list[Position] = field(default_factory=list)


@dataclass
class JoinStats:
    joined: int = 0
    decision_only: int = 0
    observation_only: int = 0
    amendment: int = 0
    dedup_hits: int = 0


class Joiner:
    def __init__(self, store: AuditStore, tracker: OffsetTracker, window_s: float) -> None:
        self.store = store
        self.tracker = tracker
        self.window_s = window_s
        self.decisions: dict[str, _Held] = {}
        self.observations: dict[str, _Held] = {}
        self.stats = JoinStats()

    def add(self, event: Event, position: Position, now: float) -> list[Output]:
        if isinstance(event, RouteDecided):
            return self._arrive(event, position, now, "decision")
        if isinstance(event, CompletionObserved):
            return self._arrive(event, position, now, "observation")
        return []

    def _arrive(self, event: Any, position: Position, now: float, side: str) -> list[Output]:
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
            pair = (event, waiting.event) if is_decision else (waiting.event, event)
            return [self._emit("joined", request_id, *pair, [waiting.position])]
        if state is not None and (state.has_observation if is_decision else state.has_decision):
            pair = (event, None) if is_decision else (None, event)
            return [self._emit("amendment", request_id, *pair, [], amends=state)]
        mine[request_id] = _Held(event, position, now)
        self.tracker.hold(position)
        return []

    def expire(self, now: float) -> list[Output]:
        """Write out what waited longer than the window for its partner."""
        outputs = []
        cutoff = now - self.window_s
        for table, join in ((self.decisions, "decision_only"),
                            (self.observations, "observation_only")):
            for request_id in [r for r, held in table.items() if held.arrived <= cutoff]:
                held = table.pop(request_id)
                decision = held.event if join == "decision_only" else None
                observation = held.event if join == "observation_only" else None
                outputs.append(
                    self._emit(join, request_id, decision, observation, [held.position])
                )
        return outputs

    def drop_partitions(self, keys: set[tuple[str, int]]) -> None:
        for table in (self.decisions, self.observations):
            for request_id in [r for r, h in table.items() if h.position[:2] in keys]:
                del table[request_id]

    def _emit(
        self,
        join: Join,
        request_id: str,
        decision: RouteDecided | None,
        observation: CompletionObserved | None,
        positions: list[Position],
        amends: Any = None,
    ) -> Output:
        reference = sorted(amends.event_ids)[0] if amends is not None and amends.event_ids else None
        record = build_record(join, request_id, decision, observation, amends=reference)
        self.store.mark(record)
        setattr(self.stats, join, getattr(self.stats, join) + 1)
        return Output(record, positions)
