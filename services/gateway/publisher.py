"""Publishing events off the request path.

A bounded in-memory queue is drained by a background task that retries until the broker
confirms each event. When the queue is full (the broker is slow or down) events spill
to an append-only spool on disk; from then on new events follow them into the spool, and
the spool is drained only once the queue is empty, so events reach Kafka in the order
they were offered. At shutdown, queued events that were not confirmed go to the front of
the spool, so a restart loses nothing.

A spool line is the event's trace context (W3C headers as JSON), a tab, and the encoded
event, so an event published from the spool still continues its request's trace. Lines
without a tab (spooled before the context was kept) are read as bare events.

One event can never hold up the others: an event that cannot be encoded, or that the
broker refuses for good (too large), is set aside (``SetAside``: a local dead-letter
file, or the review directory's quarantine) and counted, and the queue moves on. The
spool is bounded; while it has room the gateway stays ready through a broker outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Protocol

import msgspec
from aiokafka.errors import (
    CorruptRecordException,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.context import Context
from prometheus_client import CollectorRegistry, Counter, Gauge

from routemesh.contracts import (
    Event,
    EventDecodeError,
    decode_event,
    encode_event,
)
from routemesh.services.gateway.spool import Spool
from routemesh.services.runtime.kafka import Address, DeadLetters, event_address
from routemesh.services.runtime.retry import Backoff
from routemesh.services.runtime.settings import ServiceSettings
from routemesh.services.runtime.telemetry import registered

log = logging.getLogger(__name__)
Item = tuple[Event, Context]


class Producer(Protocol):
    """What the publisher sends through (``runtime.kafka.EventProducer`` in service)."""

    async def publish(self, event: Event, context: Context | None = None,
                      address: Address | None = None) -> None: ...


class _Metrics:
    """One set of series per registry; each publisher writes under its ``queue`` label."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.depth = Gauge("routemesh_gateway_publish_queue_events",
                           "Events waiting in memory to be published", ["queue"],
                           registry=registry)
        self.spool_bytes = Gauge("routemesh_gateway_spool_bytes",
                                 "Bytes of events waiting in the disk spool", ["queue"],
                                 registry=registry)
        self.spooled = Counter("routemesh_gateway_spooled_events_total",
                               "Events written to the disk spool", ["queue"], registry=registry)
        self.failures = Counter("routemesh_gateway_publish_failures_total",
                                "Publish attempts the broker did not confirm", ["queue"],
                                registry=registry)
        self.dropped = Counter("routemesh_gateway_publish_dropped_total",
                               "Events dropped: queue full and no spool configured", ["queue"],
                               registry=registry)
        self.published = Counter("routemesh_gateway_published_events_total",
                                 "Events the broker confirmed", ["queue"], registry=registry)
        self.set_aside = Counter(
            "routemesh_gateway_publish_set_aside_total",
            "Events that can never be published (unencodable, or refused for good by the "
            "broker), set aside locally instead of blocking the queue", ["queue", "kind"],
            registry=registry)


# Refused for good: retrying the same event can never succeed.
UNPUBLISHABLE: tuple[type[Exception], ...] = (
    UnicodeError, msgspec.EncodeError, MessageSizeTooLargeError, RecordListTooLargeError,
    CorruptRecordException)


def unpublishable_kind(exc: Exception) -> str:
    if isinstance(exc, UnicodeError | msgspec.EncodeError):
        return "unencodable"
    return "refused_by_broker"


class SetAside(Protocol):
    """Where what cannot be published goes, so that nothing is lost silently."""

    def unreadable(self, line: bytes, offset: int, exc: Exception) -> Event | None:
        """A spool line that cannot be read back: an event to publish in its place (a
        dead letter), or None when it was set aside some other way."""
        ...

    def unpublishable(self, event: Event, exc: Exception) -> None:
        """An event the broker will never take."""
        ...


def event_bytes(event: Event) -> bytes:
    """The event as JSON, even when it holds what the codec refuses (a lone surrogate):
    then escaped, so the bytes say what the event was."""
    try:
        return encode_event(event)
    except UNPUBLISHABLE:
        return json.dumps(msgspec.to_builtins(event), default=str).encode()


class EventPublisher:
    def __init__(
        self,
        producer: Producer,
        settings: ServiceSettings,
        registry: CollectorRegistry,
        maxsize: int = 10_000,
        concurrency: int = 64,
        spool: Spool | None = None,
        *,
        set_aside: SetAside,
        queue: str = "events",
        spool_max_bytes: int = 1 << 30,
    ) -> None:
        self.producer = producer
        self.settings = settings
        self.spool = spool
        self.set_aside = set_aside
        self.spool_max_bytes = spool_max_bytes
        self.queue_name = queue
        self._failing_since: float | None = None
        self._last_failure_log = 0.0
        # Set while nothing waits in the spool.
        self._spool_empty = asyncio.Event()
        if spool is None or not spool.pending_bytes:
            self._spool_empty.set()
        # Each event keeps the trace context it was offered in.
        self.queue: asyncio.Queue[Item] = asyncio.Queue(maxsize)
        self.concurrency = concurrency
        self._inflight: list[Item] = []
        self._tasks: list[asyncio.Task[None]] = []
        metrics = registered(registry, _Metrics)
        self.depth = metrics.depth.labels(queue)
        self.spool_bytes = metrics.spool_bytes.labels(queue)
        self.spooled = metrics.spooled.labels(queue)
        self.failures = metrics.failures.labels(queue)
        self.dropped = metrics.dropped.labels(queue)
        self.published = metrics.published.labels(queue)
        self._set_aside_counter = metrics.set_aside

    @property
    def has_room(self) -> bool:
        """Whether an event offered now would be kept: the queue or the spool has room."""
        if self.spool is None:
            return not self.queue.full()
        return self.spool.pending_bytes < self.spool_max_bytes

    def offer(self, event: Event) -> None:
        """Never blocks on Kafka: the event is queued, spooled, or (no room) dropped."""
        if self.spool is not None and (self.spool.pending_bytes or self.queue.full()):
            if not self.has_room:
                self._drop(event, "spool full")
                return
            try:
                line = spool_line(event, otel_context.get_current())
            except UNPUBLISHABLE as exc:
                self._put_aside(event, exc)
                return
            self.spool.append([line])
            self._spool_empty.clear()
            self.spooled.inc()
            self.spool_bytes.set(self.spool.pending_bytes)
            return
        try:
            self.queue.put_nowait((event, otel_context.get_current()))
        except asyncio.QueueFull:
            self._drop(event, "publish queue full and no spool")
        self.depth.set(self.queue.qsize())

    def _drop(self, event: Event, why: str) -> None:
        self.dropped.inc()
        log.error("event dropped: %s", why, extra={"event_type": type(event).__name__,
                                                    "queue": self.queue_name})

    def _put_aside(self, event: Event, exc: Exception) -> None:
        kind = unpublishable_kind(exc)
        self._set_aside_counter.labels(self.queue_name, kind).inc()
        log.error("an event that can never be published was set aside",
                  extra={"event_type": type(event).__name__, "event_id": str(event.event_id),
                         "error_kind": kind, "error": type(exc).__name__,
                         "queue": self.queue_name})
        self.set_aside.unpublishable(event, exc)

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._run_queue()))
        if self.spool is not None:
            self.spool_bytes.set(self.spool.pending_bytes)
            self._tasks.append(asyncio.create_task(self._run_spool()))

    async def _publish(self, item: Item, address: Address) -> None:
        event, ctx = item
        # The producer's span continues the request's trace from this background task.
        await self.producer.publish(event, ctx, address)

    async def _confirm_all(self, items: list[Item]) -> None:
        """Publish until the broker confirmed every item, backing off between rounds.

        Items bound for different partitions go at once; items that share a topic and a
        key (one request's events on one topic) go one after the other, and the ones
        after a failure wait for the next round: a failure never lets a later event of a
        request overtake an earlier one."""
        pending, delays = items, Backoff(0.1, 5.0).delays()
        while pending:
            lanes: dict[Address, list[Item]] = {}
            for item in pending:
                lanes.setdefault(event_address(self.settings, item[0]), []).append(item)
            results = await asyncio.gather(*(self._in_order(address, lane)
                                             for address, lane in lanes.items()))
            unsent = {id(item) for left, _, _ in results for item in left}
            failed = [item for item in pending if id(item) in unsent]
            aside = sum(count for _, count, _ in results)
            self.published.inc(len(pending) - len(failed) - aside)
            if failed:
                errors = [error for _, _, error in results if error is not None]
                self.failures.inc(len(errors))
                self._note_failure(len(failed), errors[0])
                await asyncio.sleep(next(delays))
            elif self._failing_since is not None:
                log.info("the broker confirms events again", extra={
                    "queue": self.queue_name,
                    "failing_s": round(time.monotonic() - self._failing_since, 1)})
                self._failing_since = None
            pending = failed

    async def _in_order(self, address: Address, lane: list[Item]
                        ) -> tuple[list[Item], int, Exception | None]:
        """Publish ``lane`` (its events share ``address``) one by one: what is left from
        the first failure on, how many were set aside as unpublishable, and the failure."""
        aside = 0
        for index, item in enumerate(lane):
            try:
                await self._publish(item, address)
            except UNPUBLISHABLE as exc:
                self._put_aside(item[0], exc)
                aside += 1
            except Exception as exc:
                return lane[index:], aside, exc
        return [], aside, None

    def _note_failure(self, waiting: int, error: Exception) -> None:
        """Say so when publishing starts failing, and every half minute while it does."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._last_failure_log < FAILURE_LOG_INTERVAL_S:
            return
        self._last_failure_log = now
        log.warning("the broker did not confirm events; retrying", extra={
            "queue": self.queue_name, "events": waiting, "error": type(error).__name__,
            "failing_s": round(now - self._failing_since, 1)})

    async def _run_queue(self) -> None:
        while True:
            self._inflight = [await self.queue.get()]
            while len(self._inflight) < self.concurrency and not self.queue.empty():
                self._inflight.append(self.queue.get_nowait())
            await self._confirm_all(self._inflight)
            for _ in self._inflight:
                self.queue.task_done()
            self._inflight = []
            self.depth.set(self.queue.qsize())

    async def _settled(self) -> None:
        """Until nothing waits in memory or on disk."""
        await self.queue.join()
        await self._spool_empty.wait()

    async def _run_spool(self) -> None:
        assert self.spool is not None
        while True:
            # Older events are in memory: the spool waits until they are all confirmed.
            if not self.spool.pending_bytes or not self.queue.empty() or self._inflight:
                await asyncio.sleep(0.1)
                continue
            lines, end = self.spool.read(self.concurrency)
            items = []
            for offset, line in lines:
                try:
                    items.append(read_spool_line(line))
                except (EventDecodeError, msgspec.DecodeError) as exc:
                    replacement = self.set_aside.unreadable(line, offset, exc)
                    if replacement is not None:
                        items.append((replacement, Context()))
            await self._confirm_all(items)
            self.spool.confirm(end)
            self.spool_bytes.set(self.spool.pending_bytes)
            if not self.spool.pending_bytes:
                self._spool_empty.set()

    async def drain(self, timeout_s: float) -> None:
        """On shutdown: give queued and spooled events ``timeout_s`` to be confirmed (a
        gateway scaled in leaves nothing on a volume no replica may mount again); spool
        what is left of the queue."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled(), timeout_s)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        left = list(self._inflight)
        while not self.queue.empty():
            left.append(self.queue.get_nowait())
        if self.spool is not None:
            lines = []
            for event, ctx in left:
                try:
                    lines.append(spool_line(event, ctx))
                except UNPUBLISHABLE as exc:
                    self._put_aside(event, exc)
            self.spool.prepend(lines)
            waiting = self.spool.pending_bytes
            self.spool.close()
            if waiting:
                log.warning("events spooled for the next start",
                            extra={"spool_bytes": waiting})
        elif left:
            log.error("events left unpublished at shutdown", extra={"events": len(left)})


_CARRIER = msgspec.json.Decoder(dict[str, str])
SPOOL_SOURCE = "gateway.spool"
FAILURE_LOG_INTERVAL_S = 30.0
UNPUBLISHED_FILE = "unpublished.jsonl"


def _append_private(path: Path, line: bytes) -> None:
    """Append a line to a file only its owner reads (it may hold what a client sent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as handle:
        handle.write(line + b"\n")


class DeadLettering:
    """The events' queue: an unreadable spool line goes to the dead-letter topic as it
    is (the dead letter names the spool where a consumed message names its topic; its
    offset is the line's byte offset in the spool file). An event the broker will never
    take is written as a dead letter to ``UNPUBLISHED_FILE`` in the dead-letter
    directory: not to the topic, which may refuse it for the same reason."""

    def __init__(self, dead_letters: DeadLetters, settings: ServiceSettings) -> None:
        self.dead_letters, self.settings = dead_letters, settings

    def unreadable(self, line: bytes, offset: int, exc: Exception) -> Event | None:
        kind = exc.kind if isinstance(exc, EventDecodeError) else "undecodable_trace_context"
        log.error("an unreadable spool line goes to the dead-letter topic",
                  extra={"spool_offset": offset, "error_kind": kind})
        return self.dead_letters.letter(line, source_topic=SPOOL_SOURCE, partition=-1,
                                        offset=offset, kind=kind, error=str(exc))

    def unpublishable(self, event: Event, exc: Exception) -> None:
        topic, key = event_address(self.settings, event)
        letter = self.dead_letters.letter(
            event_bytes(event), source_topic=topic, partition=-1, offset=-1, key=key,
            kind=unpublishable_kind(exc), error=f"{type(exc).__name__}: {exc}")
        _append_private(self.dead_letters.spill_dir / UNPUBLISHED_FILE, encode_event(letter))


class Quarantine:
    """The review captures' queue: what cannot be read back or published stays in a
    local file (it may hold redacted prompt text, which must not reach a shared topic)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def unreadable(self, line: bytes, offset: int, exc: Exception) -> None:
        _append_private(self.path, line)
        log.error("an unreadable spool line was set aside",
                  extra={"spool_offset": offset, "file": self.path.name})
        return None

    def unpublishable(self, event: Event, exc: Exception) -> None:
        _append_private(self.path, event_bytes(event))


def spool_line(event: Event, ctx: Context) -> bytes:
    # msgspec's JSON has no raw tabs (they are escaped inside strings): a safe separator.
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return msgspec.json.encode(carrier) + b"\t" + encode_event(event)


def read_spool_line(line: bytes) -> Item:
    head, tab, body = line.partition(b"\t")
    if not tab:
        return decode_event(line), Context()
    return decode_event(body), propagate.extract(_CARRIER.decode(head))
