"""The consumer every stream-processing service runs: read, decode, dead-letter, dedup,
hand over, and commit only what is durable.

A service gives an ``EventConsumer`` its topics, a consumer group and a handler. Each
poll's events go to the handler in one call. What the handler has made durable when the
call returns is done; an event whose effect must wait (a decision held in a join window
until its observation comes) is ``hold``-ed on the ``OffsetTracker`` and ``release``-d by
a later call once its effect is durable. A partition's committed offset never passes the
oldest held event, so a crash redelivers everything not yet durable, and the handler
(plus the consumer's own memory of handled ``event_id``s) makes the redelivery harmless.

Written on aiokafka rather than as a FastStream subscriber because FastStream acknowledges
messages one by one (committing everything consumed), which cannot hold one message back
while later ones go through. Stateless handlers that finish each message before the next
use ``runtime.kafka.subscribe_events`` (FastStream) instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import IllegalStateError, KafkaError
from opentelemetry import propagate, trace
from opentelemetry.trace import Span
from prometheus_client import CollectorRegistry, Counter, Gauge

from routemesh.contracts import Event, EventDecodeError, Topic, decode_event
from routemesh.contracts.events import utc_now
from routemesh.services.runtime.kafka import DeadLetters, RetryableError, client_kwargs
from routemesh.services.runtime.retry import Backoff
from routemesh.services.runtime.settings import ServiceSettings
from routemesh.services.runtime.telemetry import Readiness, records_spans, registered

log = logging.getLogger(__name__)

# (topic, partition, offset)
Position = tuple[str, int, int]
PartitionKey = tuple[str, int]


class OffsetTracker:
    """Per partition: the next offset to consume and the offsets still held. The safe
    commit is the oldest held offset, else the next one to consume."""

    def __init__(self) -> None:
        self._next: dict[PartitionKey, int] = {}
        self._held: dict[PartitionKey, list[int]] = defaultdict(list)
        self._holding: dict[PartitionKey, set[int]] = defaultdict(set)
        self._committed: dict[PartitionKey, int] = {}

    def consumed(self, position: Position) -> None:
        topic, partition, offset = position
        key = (topic, partition)
        self._next[key] = max(self._next.get(key, 0), offset + 1)

    def hold(self, position: Position) -> None:
        key, offset = position[:2], position[2]
        if offset not in self._holding[key]:
            self._holding[key].add(offset)
            heapq.heappush(self._held[key], offset)

    def release(self, position: Position) -> None:
        self._holding[position[:2]].discard(position[2])

    def is_held(self, position: Position) -> bool:
        return position[2] in self._holding.get(position[:2], ())

    def held_count(self) -> int:
        return sum(len(offsets) for offsets in self._holding.values())

    def _oldest_held(self, key: PartitionKey) -> int | None:
        heap, holding = self._held[key], self._holding[key]
        while heap and heap[0] not in holding:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def to_commit(self) -> dict[PartitionKey, int]:
        """Offsets that moved since the last commit."""
        moved = {}
        for key, next_offset in self._next.items():
            oldest = self._oldest_held(key)
            safe = next_offset if oldest is None else oldest
            if self._committed.get(key) != safe:
                moved[key] = safe
        return moved

    def committed(self, offsets: dict[PartitionKey, int]) -> None:
        self._committed.update(offsets)

    def committed_offset(self, key: PartitionKey) -> int | None:
        return self._committed.get(key)

    def next_offset(self, key: PartitionKey) -> int | None:
        return self._next.get(key)

    def forget(self, keys: Collection[PartitionKey]) -> None:
        """Partitions went elsewhere (or are re-read): what was held is redelivered."""
        for key in keys:
            for table in (self._next, self._held, self._holding, self._committed):
                table.pop(key, None)


@dataclass(slots=True)
class Delivery:
    """One decoded event and where it came from."""

    event: Event
    position: Position
    key: bytes | None = None
    # The consumer span of this event; ended once its effect is durable.
    span: Span | None = field(default=None, repr=False)


class BatchHandler(Protocol):
    async def handle(self, deliveries: Sequence[Delivery], offsets: OffsetTracker) -> None:
        """Make the effect of ``deliveries`` durable, or ``offsets.hold`` the positions of
        those that must wait (and ``release`` them in a later call, once durable). Called
        with no deliveries when a poll found nothing, so time-based work (a join window
        expiring) still happens. Raise ``RetryableError`` when a dependency (a disk, a
        server) failed: the consumer goes back to the last commit and redelivers."""
        ...

    def revoked(self, partitions: Collection[PartitionKey]) -> None:
        """Drop what is held for these partitions: it will be delivered again (here or to
        another instance)."""
        ...


def state_name(partition: PartitionKey) -> str:
    """How a saved state names a partition in its offsets and anchors."""
    return f"{partition[0]}:{partition[1]}"


def covering(partitions: Collection[PartitionKey], offsets: dict[str, int],
             anchors: dict[str, str]) -> tuple[dict[str, int], dict[str, str]]:
    """The share of a saved state's offsets and anchors that is these partitions': what a
    changelog partition's mark records of the input partitions it holds the state of."""
    names = {state_name(partition) for partition in partitions}
    return ({k: v for k, v in offsets.items() if k in names},
            {k: v for k, v in anchors.items() if k in names})


class Checkpoints:
    """For a handler whose effect is a state it saves whole (a detector's windows, a
    join's counts), with the offsets the state covers: which deliveries the saved state
    already holds (after a restart), and the holds that keep the consumer from committing
    what is not saved yet. Per partition, only the first unsaved position is held: the
    commit cannot pass it, so what follows needs no hold of its own."""

    def __init__(self) -> None:
        # "topic:partition" -> the next offset: every event before it is in the state.
        self.offsets: dict[str, int] = {}
        # "topic:partition" -> the event id at the offset before ``offsets``: what tells
        # the log the state was made from from another log that reached the same offset.
        self.anchors: dict[str, str] = {}
        self._durable: dict[str, int] = {}
        self._unsaved: dict[PartitionKey, Position] = {}

    def restore(self, offsets: dict[str, int], anchors: dict[str, str]) -> None:
        self.offsets = dict(offsets)
        self.anchors = dict(anchors)
        self._durable = dict(offsets)

    def adopt(self, partitions: Collection[PartitionKey], offsets: dict[str, int],
              anchors: dict[str, str]) -> None:
        """These partitions' positions as a state another instance saved says (none:
        nothing of them is in the state yet)."""
        self.forget(partitions)
        for key in partitions:
            name = state_name(key)
            if name in offsets:
                self.offsets[name] = self._durable[name] = offsets[name]
            if name in anchors:
                self.anchors[name] = anchors[name]

    def forget(self, partitions: Collection[PartitionKey]) -> None:
        """These partitions' positions go with them to their next owner."""
        for key in partitions:
            for kept in (self.offsets, self.anchors, self._durable):
                kept.pop(state_name(key), None)
            self._unsaved.pop(key, None)

    def fresh(self, deliveries: Sequence[Delivery], tracker: OffsetTracker) -> list[Delivery]:
        """The deliveries the state lacks; holds the first of each partition."""
        found = []
        for delivery in deliveries:
            topic, partition, offset = delivery.position
            key = state_name((topic, partition))
            if offset >= self._durable.get(key, 0) and (topic, partition) not in self._unsaved:
                self._unsaved[(topic, partition)] = delivery.position
                tracker.hold(delivery.position)
            if offset < self.offsets.get(key, 0):
                continue
            self.offsets[key] = offset + 1
            self.anchors[key] = str(delivery.event.event_id)
            found.append(delivery)
        return found

    async def verify(self, partitions: Collection[PartitionKey], logs: PartitionLogs
                     ) -> list[tuple[PartitionKey, str]]:
        """Start a new epoch for every partition whose log is not the one the state was
        made from (a fresh broker, a topic deleted and created again): its end is below
        the saved offset, or the event before that offset is another. Without this, every
        event of the new log below the saved offset would be skipped as already counted.
        What the state holds is kept; returns each renewed partition and why."""
        saved = {key: self.offsets[state_name(key)] for key in partitions
                 if self.offsets.get(state_name(key), 0) > 0}
        if not saved:
            return []
        logs_now = await logs.probe({key: offset - 1 for key, offset in saved.items()})
        renewed = []
        for key, offset in saved.items():
            name = state_name(key)
            end, found = logs_now[key]
            why = None
            if end < offset:
                why = f"the log ends at {end}, before the saved offset {offset}"
            elif name in self.anchors and found is not None and found != self.anchors[name]:
                why = f"offset {offset - 1} holds another event than the state's"
            if why is not None:
                self.offsets.pop(name)
                self.anchors.pop(name, None)
                self._durable.pop(name, None)
                self._unsaved.pop(key, None)
                renewed.append((key, why))
        return renewed

    @property
    def unsaved(self) -> bool:
        return bool(self._unsaved)

    def saved(self, offsets: dict[str, int]) -> None:
        """The state with these offsets is on disk."""
        self._durable = dict(offsets)

    def release(self, tracker: OffsetTracker) -> None:
        for position in self._unsaved.values():
            tracker.release(position)
        self._unsaved.clear()

    def revoked(self, partitions: Collection[PartitionKey]) -> None:
        for key in partitions:
            self._unsaved.pop(key, None)


class PartitionLogs:
    """Reads what partitions' logs hold, outside any consumer group (so nobody's offsets
    move): for ``Checkpoints.verify``. The end of a log is the high watermark of a fetch,
    not ListOffsets: the embedded broker answers ListOffsets with the last batch's base
    offset, short of the end when that batch holds several records."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings

    async def probe(self, at: dict[PartitionKey, int], timeout_s: float = 10.0
                    ) -> dict[PartitionKey, tuple[int, str | None]]:
        """Per partition: its end, and the event id at the offset given (None when it is
        past the end, gone by retention, or undecodable)."""
        consumer = AIOKafkaConsumer(**client_kwargs(self.settings), enable_auto_commit=False)
        found: dict[PartitionKey, tuple[int, str | None]] = {}
        try:
            await consumer.start()
            tps = {TopicPartition(*key): offset for key, offset in at.items()}
            consumer.assign(list(tps))
            beginnings = await consumer.beginning_offsets(list(tps))
            for tp, offset in tps.items():
                consumer.seek(tp, max(offset, beginnings[tp]))
            async with asyncio.timeout(timeout_s):
                while len(found) < len(tps):
                    batch = await consumer.getmany(timeout_ms=500, max_records=len(tps))
                    for tp, offset in tps.items():
                        key, end = (tp.topic, tp.partition), consumer.highwater(tp)
                        if key in found or end is None:
                            continue
                        records = [r for r in batch.get(tp, ()) if r.offset == offset]
                        if records or offset >= end or offset < beginnings[tp]:
                            found[key] = (end, _event_id(records[0].value) if records
                                          else None)
        finally:
            await consumer.stop()
        return found

    async def ends(self, topics: Collection[str], timeout_s: float = 10.0
                   ) -> dict[PartitionKey, int]:
        """The end of every partition of ``topics``."""
        consumer = AIOKafkaConsumer(**client_kwargs(self.settings), enable_auto_commit=False)
        try:
            await consumer.start()
            await consumer.topics()
            tps = [TopicPartition(topic, p) for topic in sorted(topics)
                   for p in sorted(consumer.partitions_for_topic(topic) or ())]
            if not tps:
                return {}
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            async with asyncio.timeout(timeout_s):
                while any(consumer.highwater(tp) is None for tp in tps):
                    await consumer.getmany(timeout_ms=200, max_records=len(tps))
            found = {(tp.topic, tp.partition): consumer.highwater(tp) for tp in tps}
            return {key: end for key, end in found.items() if end is not None}
        finally:
            await consumer.stop()


def _event_id(value: bytes | None) -> str | None:
    try:
        return str(decode_event(value or b"").event_id)
    except EventDecodeError:
        return None


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter("routemesh_consumer_events_total",
                              "Events handed to a consumer's handler", ["group", "topic"],
                              registry=registry)
        self.dedup = Counter("routemesh_consumer_dedup_hits_total",
                             "Events skipped because their event_id was already handled",
                             ["group"], registry=registry)
        self.lag = Gauge("routemesh_consumer_lag_messages",
                         "Messages between the committed offset and the partition end "
                         "(set on every poll, so it grows while nothing commits)",
                         ["group", "topic", "partition"], registry=registry)
        self.unread = Gauge("routemesh_consumer_unread_messages",
                            "Messages between the next offset to read and the partition end",
                            ["group", "topic", "partition"], registry=registry)
        # With the end offsets from the broker, what `routemesh dev` drains by: an
        # instance's own unread count rests on the end its last fetch saw, which may
        # predate the last events of a producer that just stopped.
        self.read = Gauge("routemesh_consumer_read_offset",
                          "The next offset the consumer reads in a partition",
                          ["group", "topic", "partition"], registry=registry)
        # 0 for a subscribed topic with no partition here: the subscription shows, so a
        # partition held by no live instance (a dead member not yet expired) is seen.
        self.assigned = Gauge("routemesh_consumer_assigned_partitions",
                              "Partitions of a subscribed topic assigned to this instance",
                              ["group", "topic"], registry=registry)
        self.held = Gauge("routemesh_consumer_held_events",
                          "Events consumed whose effect is not durable yet", ["group"],
                          registry=registry)
        self.retries = Counter("routemesh_consumer_retries_total",
                               "Batches redelivered after the handler asked to retry",
                               ["group"], registry=registry)
        self.commits = Counter("routemesh_consumer_commits_total",
                               "Commits that moved a consumer group's offsets: none for a "
                               "while with a lag is a stalled consumer", ["group"],
                               registry=registry)
        self.epochs = Counter("routemesh_consumer_partition_epochs_total",
                              "Partitions whose log was not the one the saved state was "
                              "made from (a fresh broker, a topic made again): a new epoch "
                              "was started", ["group", "topic"], registry=registry)


class _SeenEvents:
    """The ``event_id``s of recently handled events, oldest forgotten first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[Any, None] = OrderedDict()

    def __contains__(self, event_id: Any) -> bool:
        return event_id in self._ids

    def add(self, event_id: Any) -> None:
        self._ids[event_id] = None
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


class EventConsumer:
    def __init__(
        self,
        settings: ServiceSettings,
        topics: Sequence[Topic],
        *,
        group_id: str,
        handler: BatchHandler,
        dead_letters: DeadLetters,
        registry: CollectorRegistry,
        service: str,
        tracer_provider: trace.TracerProvider | None = None,
        batch_max_records: int = 2000,
        poll_ms: int = 100,
        dedup_capacity: int = 100_000,
        readiness: Readiness | None = None,
        checkpoints: Checkpoints | None = None,
        on_assigned: Callable[[Collection[PartitionKey]], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        # A handler that keeps a saved state: a partition is verified against it before
        # its first records after an assignment are handed over.
        self.checkpoints = checkpoints
        # A handler whose state of a partition lives outside the process (files another
        # instance wrote while it owned the partition, a changelog): given the partitions
        # of each assignment at the first poll after it, before their first records.
        self.on_assigned = on_assigned
        # Partitions taken over since they were assigned.
        self._known: set[PartitionKey] = set()
        self.group_id = group_id
        self.handler = handler
        self.dead_letters = dead_letters
        self.service = service
        self.topics = [settings.topic(t) for t in topics]
        self.accepted = frozenset(e for t in topics for e in t.events)
        self.batch_max_records = batch_max_records
        self.poll_ms = poll_ms
        self.offsets = OffsetTracker()
        self.tracer = trace.get_tracer("routemesh.consumer", tracer_provider=tracer_provider)
        self._tracing = records_spans(tracer_provider)
        self._seen = _SeenEvents(dedup_capacity)
        self._open: dict[Position, Delivery] = {}
        self._metrics = registered(registry, _Metrics)
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._batch = asyncio.Lock()
        # When a poll was last handled through (or found nothing): a consumer stuck on one
        # message (a dead letter the broker refuses, a handler that hangs or keeps asking
        # to retry) stops moving it, and is then not ready.
        self.last_progress = time.monotonic()
        self.readiness = readiness
        self.stall_after_s = settings.consumer_stall_s
        self._metrics.commits.labels(group_id)
        for topic in self.topics:
            self._metrics.assigned.labels(group_id, topic)

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            **client_kwargs(self.settings),
            group_id=self.group_id,
            client_id=f"routemesh-{self.service}-{self.settings.instance_id or 'single'}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Topics keyed by request_id with equal partition counts: the range assignor
            # gives one instance the same partitions of each, so a request's events meet.
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_poll_interval_ms=300_000,
        )
        self._consumer.subscribe(self.topics, listener=_Rebalance(self))
        await self._consumer.start()
        self.last_progress = time.monotonic()
        self._task = asyncio.create_task(self._run(), name=f"consume-{self.group_id}")
        self._task.add_done_callback(self._ended)
        if self.readiness is not None:
            self.readiness.set_alive(f"consumer:{self.group_id}", True, "consuming")
            self._watch = asyncio.create_task(self._watch_progress())

    async def stop(self) -> None:
        """Stop polling; let the handler finish its batch; commit what is durable."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self.commit()
            await self._consumer.stop()
        for delivery in self._open.values():
            if delivery.span is not None:
                delivery.span.end()
        self._open.clear()

    def assignment(self) -> set[PartitionKey]:
        """The partitions the group gives this instance now."""
        return {(tp.topic, tp.partition) for tp in self._held()}

    def _held(self) -> set[TopicPartition]:
        """The partitions this instance holds now: none while the group rejoins. aiokafka's
        assignment() goes on naming the revoked partitions until the new assignment
        arrives, and a poll meanwhile must not take them over again (their state would
        stay here, stale, once another instance owns them), hand on their records or
        report their figures. Its only sign of a rejoin is private, hence getattr."""
        if self._consumer is None:
            return set()
        subscription = getattr(self._consumer, "_subscription", None)
        if subscription is not None and subscription.reassignment_in_progress:
            return set()
        return set(self._consumer.assignment())

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def progress(self) -> tuple[bool, str]:
        """Whether the consumer is moving, and if not, why."""
        task = self._task
        if task is None or task.done():
            failure = task.exception() if task is not None and not task.cancelled() else None
            return False, f"stopped by {type(failure).__name__}" if failure else "not running"
        stalled_s = time.monotonic() - self.last_progress
        if stalled_s > self.stall_after_s:
            return False, f"no poll handled for {stalled_s:.0f} s"
        return True, ""

    def _ended(self, task: asyncio.Task[None]) -> None:
        failure = None if task.cancelled() else task.exception()
        if failure is not None:
            log.error("the consume loop ended on an error", exc_info=failure,
                      extra={"group": self.group_id})
        if self.readiness is not None and not self._stopping.is_set():
            # A consume loop that ended is never coming back: the process is not alive.
            why = f"stopped by {type(failure).__name__}" if failure else "ended"
            self.readiness.set_alive(f"consumer:{self.group_id}", False,
                                     f"the consume loop {why}")

    async def _watch_progress(self) -> None:
        assert self.readiness is not None
        name = f"consumer:{self.group_id}"
        while True:
            ok, detail = self.progress()
            self.readiness.set(name, ok, detail)
            await asyncio.sleep(min(self.stall_after_s / 4, 5.0))

    async def _run(self) -> None:
        assert self._consumer is not None
        backoff = Backoff(0.5, 10.0)
        delays = backoff.delays()
        while not self._stopping.is_set():
            batch = await self._consumer.getmany(
                timeout_ms=self.poll_ms, max_records=self.batch_max_records
            )
            # A revoke waits for the batch in hand, and a batch for the revoke: the handler
            # never works on a partition the group has given to another instance.
            async with self._batch:
                retry = await self._handle(batch)
            if retry:
                await asyncio.sleep(next(delays))
                continue
            delays = backoff.delays()
            self.last_progress = time.monotonic()

    async def _handle(self, batch: dict[TopicPartition, list[Any]]) -> bool:
        """Hand ``batch`` over and commit what is durable; True: the handler asked to
        retry, and the partitions are rewound to their last commit."""
        assert self._consumer is not None
        held = self._held()
        batch = {tp: records for tp, records in batch.items() if tp in held}
        # Records may arrive before the rebalance listener has run, so partitions are
        # taken over here, before their first records reach the handler: every partition
        # given since the last poll at once, with records or not, so that a service reads
        # its state once per assignment and an idle partition's state is ready too.
        fresh = {(tp.topic, tp.partition) for tp in held} - self._known
        if fresh:
            # The state of a partition is taken over first, then checked against its log.
            try:
                if self.on_assigned is not None:
                    await self.on_assigned(fresh)
                await self.verify(fresh)
            except (KafkaError, OSError) as exc:
                # Its state could not be read (a changelog, files): nothing of the poll is
                # handed on, and the next poll takes the partitions over again.
                return await self._retry("partitions not taken over; retrying", exc)
            self._known |= fresh
        deliveries = await self._deliveries(batch)
        try:
            await self.handler.handle(deliveries, self.offsets)
        except RetryableError as exc:
            return await self._retry("handler asked to retry; rewinding to the last commit",
                                     exc)
        self._close_done()
        await self.commit()
        await self._export_lag()
        return False

    async def _retry(self, message: str, exc: Exception) -> bool:
        """Back to the last commit, so that the next poll delivers it all again."""
        log.warning(message, extra={"group": self.group_id, "error": str(exc)})
        self._metrics.retries.labels(self.group_id).inc()
        await self._rewind()
        await self._export_lag()
        return True

    async def _export_lag(self) -> None:
        """Per assigned partition: what is not committed and what is not read yet. Set
        on every poll, retries included: a consumer stuck retrying shows a lag that grows
        with every event produced, which is what the stall and lag alerts read."""
        assert self._consumer is not None
        assignment = self._held()
        for topic in self.topics:
            self._metrics.assigned.labels(self.group_id, topic).set(
                sum(tp.topic == topic for tp in assignment))
        for tp in assignment:
            end = self._consumer.highwater(tp)
            key, labels = (tp.topic, tp.partition), (self.group_id, tp.topic, str(tp.partition))
            if end is None:
                # Not fetched since it was assigned: what is unread is unknown, not none.
                self._metrics.unread.labels(*labels).set(float("nan"))
                continue
            committed = self.offsets.committed_offset(key)
            read = self.offsets.next_offset(key)
            if read is None:
                # Nothing read from it yet (an empty partition): where the reader stands.
                try:
                    read = await self._consumer.position(tp)
                except IllegalStateError:
                    continue  # revoked meanwhile

            if committed is not None:
                self._metrics.lag.labels(*labels).set(max(end - committed, 0))
            if read is not None:
                self._metrics.unread.labels(*labels).set(max(end - read, 0))
                self._metrics.read.labels(*labels).set(read)

    async def _deliveries(self, batch: dict[TopicPartition, list[Any]]) -> list[Delivery]:
        """A poll's records as deliveries: undecodable ones dead-lettered, ones already
        handled (or in hand) skipped. Counted per poll, not per event: this loop is the
        consumer's whole per-event cost."""
        deliveries: list[Delivery] = []
        skipped = 0
        for tp, records in batch.items():
            before = len(deliveries)
            for record in records:
                position = (tp.topic, tp.partition, record.offset)
                self.offsets.consumed(position)
                try:
                    event = decode_event(record.value or b"", self.accepted)
                except EventDecodeError as exc:
                    await self._dead_letter(record, position, exc.kind, str(exc))
                    continue
                if event.event_id in self._seen or position in self._open:
                    skipped += 1
                    continue
                delivery = Delivery(event, position, record.key, self._span(tp.topic, record))
                self._open[position] = delivery
                deliveries.append(delivery)
            if len(deliveries) > before:
                self._metrics.events.labels(self.group_id, tp.topic).inc(len(deliveries) - before)
        if skipped:
            self._metrics.dedup.labels(self.group_id).inc(skipped)
        return deliveries

    def _span(self, topic: str, record: Any) -> Span | None:
        """The event's consumer span, a child of its producer's; none when no span is
        recorded (no exporter), where making one would cost the most of a delivery."""
        if not self._tracing:
            return None
        carrier = {k: v.decode("latin-1") for k, v in record.headers or ()}
        return self.tracer.start_span(
            f"{topic} process", context=propagate.extract(carrier),
            kind=trace.SpanKind.CONSUMER,
            attributes={"messaging.system": "kafka", "messaging.destination.name": topic,
                        "messaging.consumer.group.name": self.group_id,
                        "messaging.kafka.message.offset": record.offset},
        )

    def _close_done(self) -> None:
        """End the spans of events whose effect is durable, and remember their ids."""
        done = [p for p in self._open if not self.offsets.is_held(p)]
        for position in done:
            delivery = self._open.pop(position)
            self._seen.add(delivery.event.event_id)
            if delivery.span is not None:
                delivery.span.end()
        self._metrics.held.labels(self.group_id).set(self.offsets.held_count())

    async def _dead_letter(self, record: Any, position: Position, kind: str, error: str) -> None:
        """Publish the dead letter, retrying while the broker refuses. Its offset is held
        until it is sent, so a stop (or crash) meanwhile never commits past it."""
        self.offsets.hold(position)
        delays = Backoff(0.5, 10.0).delays()
        while True:
            try:
                await self.dead_letters.send(record, self.group_id, kind, error)
            except Exception:
                log.exception("could not publish a dead letter; retrying")
                if self._stopping.is_set():
                    return
                await asyncio.sleep(next(delays))
            else:
                self.offsets.release(position)
                return

    async def _rewind(self) -> None:
        """Back to the last commit of every assigned partition, forgetting what was held."""
        assert self._consumer is not None
        assigned = self._held()
        keys = {(tp.topic, tp.partition) for tp in assigned}
        self._drop(keys)
        for tp in assigned:
            committed = await self._consumer.committed(tp)
            if committed is None:
                await self._consumer.seek_to_beginning(tp)
                committed = await self._consumer.position(tp)
            else:
                self._consumer.seek(tp, committed)
            # Where the lag is measured from while nothing commits.
            self.offsets.committed({(tp.topic, tp.partition): committed})

    def _drop(self, keys: Collection[PartitionKey]) -> None:
        self._known -= set(keys)
        # Their figures go with them: another instance reports them now.
        for topic, partition in keys:
            for gauge in (self._metrics.lag, self._metrics.unread, self._metrics.read):
                with contextlib.suppress(KeyError):
                    gauge.remove(self.group_id, topic, str(partition))
        self.handler.revoked(keys)
        self.offsets.forget(keys)
        for position in [p for p in self._open if p[:2] in keys]:
            delivery = self._open.pop(position)
            if delivery.span is not None:
                delivery.span.end()

    async def verify(self, partitions: Collection[PartitionKey]) -> None:
        """Newly assigned partitions against the saved state (``Checkpoints.verify``):
        a new epoch is said loudly (a log line, a metric, a readiness note)."""
        if self.checkpoints is None or not partitions:
            return
        renewed = await self.checkpoints.verify(partitions, PartitionLogs(self.settings))
        for (topic, partition), why in renewed:
            log.warning("a partition's log is not the one the saved state was made from; "
                        "starting a new epoch for it (the figures already earned are kept)",
                        extra={"group": self.group_id, "topic": topic,
                               "partition": partition, "why": why})
            self._metrics.epochs.labels(self.group_id, topic).inc()
        if renewed and self.readiness is not None:
            names = ", ".join(f"{t}[{p}]" for (t, p), _ in renewed)
            self.readiness.note(f"epochs:{self.group_id}", False,
                                f"new epoch at {utc_now().isoformat()} for {names}")

    async def commit(self) -> None:
        assert self._consumer is not None
        moved = self.offsets.to_commit()
        if not moved:
            return
        await self._consumer.commit({TopicPartition(t, p): o for (t, p), o in moved.items()})
        self.offsets.committed(moved)
        self._metrics.commits.labels(self.group_id).inc()


# aiokafka ships no types: its listener base is Any to the checker.
class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, consumer: EventConsumer) -> None:
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        # Commit what is safe; what is held goes back to the partition's next owner.
        async with self.consumer._batch:
            with contextlib.suppress(Exception):
                await self.consumer.commit()
            self.consumer._drop({(tp.topic, tp.partition) for tp in revoked})

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        pass


class TopicNotFound(LookupError):
    pass


async def read_records(
    settings: ServiceSettings, topic: str, *, from_beginning: bool, idle_s: float | None
) -> AsyncGenerator[Any, None]:
    """Every record of ``topic`` as it arrives (from its start, or from now), raw and in
    partition order, until ``idle_s`` pass without one. No consumer group: reading moves
    nobody's committed offsets."""
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)
    try:
        await consumer.start()
        await consumer.topics()  # metadata, so that partitions_for_topic knows the topic
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise TopicNotFound(f"topic {topic} does not exist")
        assignment = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assignment)
        if from_beginning:
            await consumer.seek_to_beginning(*assignment)
        else:
            await consumer.seek_to_end(*assignment)
        while True:
            batch = await consumer.getmany(timeout_ms=int((idle_s or 3600) * 1000))
            if not batch and idle_s is not None:
                return
            for records in batch.values():
                for record in records:
                    yield record
    finally:
        await consumer.stop()


async def _read_to_ends(
    settings: ServiceSettings, topics: Sequence[str],
    first: Callable[[AIOKafkaConsumer, list[TopicPartition], dict[TopicPartition, int]],
                    Awaitable[dict[TopicPartition, int | None]]],
) -> list[Event]:
    """The decodable events of ``topics``, each partition from the offset ``first`` gives
    it (None: none of it) up to the end offsets seen at the start, so it ends; in
    partition order. No consumer group: reading moves nobody's committed offsets."""
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)
    found: list[Event] = []
    try:
        await consumer.start()
        await consumer.topics()
        assignment = [TopicPartition(topic, p) for topic in topics
                      for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not assignment:
            return found
        consumer.assign(assignment)
        ends = await consumer.end_offsets(assignment)
        starts = await first(consumer, assignment, ends)
        left = set()
        for tp in assignment:
            start = starts.get(tp)
            if start is not None and start < ends[tp]:
                consumer.seek(tp, start)
                left.add(tp)
        while left:
            batch = await consumer.getmany(*left, timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    with contextlib.suppress(EventDecodeError):
                        found.append(decode_event(record.value))
            left = {tp for tp in left if await consumer.position(tp) < ends[tp]}
    finally:
        await consumer.stop()
    return found


async def recent_event_ids(
    settings: ServiceSettings, topic: str, per_partition: int
) -> set[uuid.UUID]:
    """The ``event_id``s of the newest ``per_partition`` events of each partition of
    ``topic``: what a service checks before publishing again what it may have published
    just before a crash."""

    async def newest(consumer: AIOKafkaConsumer, assignment: list[TopicPartition],
                     ends: dict[TopicPartition, int]) -> dict[TopicPartition, int | None]:
        beginnings = await consumer.beginning_offsets(assignment)
        return {tp: max(beginnings[tp], ends[tp] - per_partition) for tp in assignment}

    return {event.event_id for event in await _read_to_ends(settings, [topic], newest)}


async def events_since(settings: ServiceSettings, topics: Sequence[Topic], since: datetime
                       ) -> list[Event]:
    """The decodable events of ``topics`` from ``since`` (by broker timestamp) up to the
    topics' ends when called, in partition order."""

    async def at(consumer: AIOKafkaConsumer, assignment: list[TopicPartition],
                 ends: dict[TopicPartition, int]) -> dict[TopicPartition, int | None]:
        found = await consumer.offsets_for_times(
            dict.fromkeys(assignment, int(since.timestamp() * 1000)))
        return {tp: None if o is None else o.offset for tp, o in found.items()}

    return await _read_to_ends(settings, [settings.topic(t) for t in topics], at)
