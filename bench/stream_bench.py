"""What the stream benches (bench/drift.py, bench/scorer.py) share: publishing their
events, and what they measure a service against: a plain aiokafka reader that decodes
nothing and the consumer runtime with a handler that does nothing, both timed from their
first event to their last, and a service's own handler timed the same way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from routemesh.contracts import Event, Topic, encode_event, topic_for_event
from routemesh.services.runtime.consumer import EventConsumer
from routemesh.services.runtime.service import ServiceContext
from routemesh.services.runtime.settings import ServiceSettings


async def publish_events(settings: ServiceSettings, events: Iterable[Event]) -> int:
    """Publish each event to its topic, keyed by request id; the number published."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    sent = 0
    try:
        pending = []
        for event in events:
            pending.append(await producer.send(
                settings.topic(topic_for_event(type(event))), encode_event(event),
                key=event.request_id.encode()))
            sent += 1
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return sent


class Clock:
    """Times a reader from its first events to its last, so joining the group (seconds on
    the embedded broker) is not counted as reading."""

    def __init__(self, n: int) -> None:
        self.n, self.seen, self.first = n, 0, 0.0

    def saw(self, count: int) -> None:
        if count and not self.first:
            self.first = time.perf_counter()
        self.seen += count

    def rate(self) -> float:
        return self.n / (time.perf_counter() - self.first)

    async def done(self) -> float:
        while self.seen < self.n:
            await asyncio.sleep(0.002)
        return self.rate()


async def raw_reader(settings: ServiceSettings, topics: Sequence[Topic], n: int) -> float:
    consumer = AIOKafkaConsumer(*(settings.topic(t) for t in topics),
                                bootstrap_servers=settings.kafka_bootstrap_servers,
                                group_id=f"raw-{time.monotonic_ns()}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    clock = Clock(n)
    try:
        while clock.seen < n:
            batch = await consumer.getmany(timeout_ms=100, max_records=2000)
            clock.saw(sum(len(records) for records in batch.values()))
        return clock.rate()
    finally:
        await consumer.stop()


class Counting:
    """The consume-only handler: counts, makes nothing durable that needs waiting for."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def handle(self, deliveries, offsets) -> None:
        self.clock.saw(len(deliveries))

    def revoked(self, partitions) -> None:
        pass


async def runtime_reader(ctx: ServiceContext, topics: Sequence[Topic], n: int) -> float:
    clock = Clock(n)
    consumer = EventConsumer(ctx.settings, list(topics),
                             group_id=f"noop-{time.monotonic_ns()}", handler=Counting(clock),
                             dead_letters=ctx.dead_letters, registry=ctx.registry,
                             service="bench", batch_max_records=2000)
    await consumer.start()
    try:
        return await clock.done()
    finally:
        await consumer.stop()


async def service_reader(service, n: int, per_event_us: list[float]) -> float:
    """Start ``service`` (fresh group and state) and time its handler until it has seen
    ``n`` events: events/s, and each batch's handler time per event in ``per_event_us``."""
    service.consumer.group_id = f"{service.consumer.group_id}-{time.monotonic_ns()}"
    handle = service.handle
    clock = Clock(n)

    async def timed(deliveries, offsets) -> None:
        started = time.perf_counter()
        await handle(deliveries, offsets)
        if deliveries:
            per_event_us.append((time.perf_counter() - started) / len(deliveries) * 1e6)
        clock.saw(len(deliveries))

    service.handle = timed
    await service.start()
    try:
        return await clock.done()
    finally:
        await service.stop()
