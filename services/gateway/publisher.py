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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.context import Context
from prometheus_client import CollectorRegistry, Counter, Gauge

from routemesh.contracts import (
    DeadLetter,
    Event,
    EventDecodeError,
    decode_event,
    encode_event,
)
from routemesh.services.gateway.spool import Spool
from routemesh.services.runtime.kafka import DeadLetters, event_address
from routemesh.services.runtime.retry import Backoff
from routemesh.services.runtime.settings import ServiceSettings
from routemesh.services.runtime.telemetry import registered

log = logging.getLogger(__name__)
Item = tuple[Event, Context]


class Producer(Protocol):
    """What the publisher sends through (``runtime.kafka.EventProducer`` in service)."""

    async def publish(self, event: Event, context: Context | None = None) -> None: ...


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


# What becomes of a spool line that cannot be read back: an event to publish in its
# place (a dead letter), or None when it was set aside some other way.
Unreadable = Callable[[bytes, int, Exception], Event | None]


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
        unreadable: Unreadable,
        queue: str = "events",
    ) -> None:
        self.producer = producer
        self.settings = settings
        self.spool = spool
        self.unreadable = unreadable
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

    def offer(self, event: Event) -> None:
        """Never blocks on Kafka: the event is queued, spooled, or (no spool) dropped."""
        if self.spool is not None and (self.spool.pending_bytes or self.queue.full()):
            self.spool.append([spool_line(event, otel_context.get_current())])
            self.spooled.inc()
            self.spool_bytes.set(self.spool.pending_bytes)
            return
        try:
            self.queue.put_nowait((event, otel_context.get_current()))
        except asyncio.QueueFull:
            self.dropped.inc()
            log.error("publish queue full and no spool; event dropped",
                      extra={"event_type": type(event).__name__})
        self.depth.set(self.queue.qsize())

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._run_queue()))
        if self.spool is not None:
            self.spool_bytes.set(self.spool.pending_bytes)
            self._tasks.append(asyncio.create_task(self._run_spool()))

    async def _publish(self, item: Item) -> None:
        event, ctx = item
        # The producer's span continues the request's trace from this background task.
        await self.producer.publish(event, ctx)

    async def _confirm_all(self, items: list[Item]) -> None:
        """Publish until the broker confirmed every item, backing off between rounds.

        Items bound for different partitions go at once; items that share a topic and a
        key (one request's events on one topic) go one after the other, and the ones
        after a failure wait for the next round: a failure never lets a later event of a
        request overtake an earlier one."""
        pending, delays = items, Backoff(0.1, 5.0).delays()
        while pending:
            lanes: dict[tuple[str, bytes | None], list[Item]] = {}
            for item in pending:
                lanes.setdefault(event_address(self.settings, item[0]), []).append(item)
            left = await asyncio.gather(*(self._in_order(lane) for lane in lanes.values()))
            unsent = {id(item) for lane in left for item in lane}
            failed = [item for item in pending if id(item) in unsent]
            self.published.inc(len(pending) - len(failed))
            if failed:
                self.failures.inc(len(left) - left.count([]))
                await asyncio.sleep(next(delays))
            pending = failed

    async def _in_order(self, lane: list[Item]) -> list[Item]:
        """Publish ``lane`` one by one; return what is left from the first failure on."""
        for index, item in enumerate(lane):
            try:
                await self._publish(item)
            except Exception:
                return lane[index:]
        return []

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
                    replacement = self.unreadable(line, offset, exc)
                    if replacement is not None:
                        items.append((replacement, Context()))
            await self._confirm_all(items)
            self.spool.confirm(end)
            self.spool_bytes.set(self.spool.pending_bytes)

    async def drain(self, timeout_s: float) -> None:
        """On shutdown: give queued events ``timeout_s`` to be confirmed; spool the rest."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout_s)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        left = list(self._inflight)
        while not self.queue.empty():
            left.append(self.queue.get_nowait())
        if self.spool is not None:
            self.spool.prepend([spool_line(event, ctx) for event, ctx in left])
            waiting = self.spool.pending_bytes
            self.spool.close()
            if waiting:
                log.warning("events spooled for the next start",
                            extra={"spool_bytes": waiting})
        elif left:
            log.error("events left unpublished at shutdown", extra={"events": len(left)})


_CARRIER = msgspec.json.Decoder(dict[str, str])
SPOOL_SOURCE = "gateway.spool"


def dead_lettering(dead_letters: DeadLetters) -> Unreadable:
    """Send unreadable spool lines to the dead-letter topic, as they are. The dead letter
    names the spool where a consumed message names its topic; its offset is the line's
    byte offset in the spool file."""

    def to_dlq(line: bytes, offset: int, exc: Exception) -> DeadLetter:
        kind = exc.kind if isinstance(exc, EventDecodeError) else "undecodable_trace_context"
        log.error("an unreadable spool line goes to the dead-letter topic",
                  extra={"spool_offset": offset, "error_kind": kind})
        return dead_letters.letter(line, source_topic=SPOOL_SOURCE, partition=-1,
                                   offset=offset, kind=kind, error=str(exc))

    return to_dlq


def quarantine(path: Path) -> Unreadable:
    """Set unreadable spool lines aside in a local file instead of dead-lettering them:
    for spools whose lines may hold text that must not reach a shared topic."""

    def set_aside(line: bytes, offset: int, exc: Exception) -> None:
        with path.open("ab") as handle:
            handle.write(line + b"\n")
        log.error("an unreadable spool line was set aside",
                  extra={"spool_offset": offset, "file": path.name})

    return set_aside


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
