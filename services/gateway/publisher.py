"""Publishing events off the request path: a bounded queue drained by a background task
that retries until the broker confirms each event."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from faststream.kafka import KafkaBroker
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from prometheus_client import CollectorRegistry, Counter, Gauge

from routemesh.contracts import Event
from routemesh.services.runtime.kafka import publish_event
from routemesh.services.runtime.settings import ServiceSettings

log = logging.getLogger(__name__)


class EventPublisher:
    def __init__(
        self,
        broker: KafkaBroker,
        settings: ServiceSettings,
        registry: CollectorRegistry,
        maxsize: int = 10_000,
        concurrency: int = 64,
    ) -> None:
        self.broker = broker
        self.settings = settings
        # Each event keeps the trace context it was offered in, so its publish span (and
        # the traceparent header) continue the request's trace from the background task.
        self.queue: asyncio.Queue[tuple[Event, Context]] = asyncio.Queue(maxsize)
        self.concurrency = concurrency
        self._task: asyncio.Task[None] | None = None
        self.depth = Gauge("routemesh_gateway_publish_queue_events",
                           "Events waiting to be published", registry=registry)
        self.failures = Counter("routemesh_gateway_publish_failures_total",
                                "Publish attempts the broker did not confirm", registry=registry)
        self.dropped = Counter("routemesh_gateway_publish_dropped_total",
                               "Events dropped because the publish queue was full",
                               registry=registry)
        self.published = Counter("routemesh_gateway_published_events_total",
                                 "Events the broker confirmed", registry=registry)

    def offer(self, event: Event) -> None:
        """Never blocks the request: the event is queued, or counted as dropped."""
        try:
            self.queue.put_nowait((event, otel_context.get_current()))
        except asyncio.QueueFull:
            self.dropped.inc()
            log.error("publish queue full; event dropped",
                      extra={"event_type": type(event).__name__})
        self.depth.set(self.queue.qsize())

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.concurrency and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            pending = batch
            backoff = 0.1
            while pending:
                results = await asyncio.gather(
                    *(self._publish(event, ctx) for event, ctx in pending),
                    return_exceptions=True,
                )
                failed = [item for item, r in zip(pending, results, strict=True)
                          if isinstance(r, BaseException)]
                self.published.inc(len(pending) - len(failed))
                if failed:
                    self.failures.inc(len(failed))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                pending = failed
            for _ in batch:
                self.queue.task_done()
            self.depth.set(self.queue.qsize())

    async def _publish(self, event: Event, ctx: Context) -> None:
        token = otel_context.attach(ctx)
        try:
            await publish_event(self.broker, self.settings, event)
        finally:
            otel_context.detach(token)

    async def drain(self, timeout_s: float) -> None:
        """On shutdown: give every queued event ``timeout_s`` to be confirmed, then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not self.queue.empty():
            log.error("events left unpublished at shutdown",
                      extra={"events": self.queue.qsize()})
