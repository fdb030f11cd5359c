"""The publisher across an outage and a restart, with a stand-in broker object."""

import asyncio
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from routemesh.contracts import DeadLetter, OutcomeReported, encode_event
from routemesh.services.gateway.publisher import EventPublisher, dead_lettering, quarantine
from routemesh.services.gateway.spool import Spool
from routemesh.services.runtime.kafka import DeadLetters, event_address
from routemesh.services.runtime.settings import ServiceSettings


class StandInBroker:
    """Records what it is asked to publish; refuses everything while ``down``."""

    def __init__(self, down: bool) -> None:
        self.down = down
        self.published: list[str] = []
        self.traces: dict[str, str] = {}
        self.dead_letters: list[tuple[str, DeadLetter]] = []

    async def publish(self, event, context=None):
        await asyncio.sleep(0)
        if self.down:
            raise ConnectionError("broker unreachable")
        topic = event_address(ServiceSettings(), event)[0]
        if isinstance(event, DeadLetter):
            self.dead_letters.append((topic, event))
            return
        self.published.append(event.request_id)
        trace_id = trace.get_current_span(context).get_span_context().trace_id
        self.traces[event.request_id] = f"{trace_id:032x}"


def make_publisher(producer, registry, *args, unreadable=None, **options) -> EventPublisher:
    """A publisher whose unreadable spool lines become dead letters, unless told otherwise."""
    spool = options.get("spool")
    spill = (spool.path.parent if spool else Path("/nonexistent")) / "dead-letters"
    return EventPublisher(producer, ServiceSettings(), registry, *args, **options,
                          unreadable=unreadable or
                          dead_lettering(DeadLetters(None, "gateway", CollectorRegistry(),
                                                     spill_dir=spill)))


def event(i: int) -> OutcomeReported:
    return OutcomeReported(request_id=f"r{i:03d}", completed=True)


async def test_an_outage_and_a_restart_lose_nothing_and_keep_the_order(tmp_path):
    down = StandInBroker(down=True)
    first = make_publisher(down, CollectorRegistry(), maxsize=5, concurrency=2,
                           spool=Spool(tmp_path))
    await first.start()
    for i in range(30):
        first.offer(event(i))
        await asyncio.sleep(0)
    assert first.spool.pending_bytes > 0, "the full queue spilled to disk"
    await first.drain(timeout_s=0.2)
    assert down.published == []

    up = StandInBroker(down=False)
    second = make_publisher(up, CollectorRegistry(), maxsize=5, concurrency=2,
                            spool=Spool(tmp_path))
    await second.start()
    second.offer(event(30))
    async with asyncio.timeout(10):
        while len(up.published) < 31:
            await asyncio.sleep(0.01)
    await second.drain(timeout_s=1)
    assert up.published == [f"r{i:03d}" for i in range(31)]
    assert Spool(tmp_path).pending_bytes == 0


async def test_without_a_spool_a_full_queue_drops_and_counts(tmp_path):
    registry = CollectorRegistry()
    publisher = make_publisher(StandInBroker(down=True), registry, maxsize=3)
    for i in range(5):
        publisher.offer(event(i))
    assert registry.get_sample_value(
        "routemesh_gateway_publish_dropped_total", {"queue": "events"}) == 2


async def test_spooled_events_keep_their_request_trace(tmp_path):
    tracer = TracerProvider().get_tracer("test")
    down = StandInBroker(down=True)
    first = make_publisher(down, CollectorRegistry(), maxsize=2, concurrency=1,
                           spool=Spool(tmp_path))
    await first.start()
    traces = {}
    for i in range(8):
        with tracer.start_as_current_span("request") as span:
            first.offer(event(i))
            traces[f"r{i:03d}"] = f"{span.get_span_context().trace_id:032x}"
        await asyncio.sleep(0)
    await first.drain(timeout_s=0.1)

    up = StandInBroker(down=False)
    second = make_publisher(up, CollectorRegistry(), spool=Spool(tmp_path))
    await second.start()
    async with asyncio.timeout(10):
        while len(up.published) < 8:
            await asyncio.sleep(0.01)
    await second.drain(timeout_s=1)
    assert up.traces == traces, "from memory and from the spool alike"


async def test_spool_lines_written_before_trace_context_still_publish(tmp_path):
    spool = Spool(tmp_path)
    spool.append([encode_event(event(1))])
    spool.close()
    up = StandInBroker(down=False)
    publisher = make_publisher(up, CollectorRegistry(), spool=Spool(tmp_path))
    await publisher.start()
    async with asyncio.timeout(10):
        while not up.published:
            await asyncio.sleep(0.01)
    await publisher.drain(timeout_s=1)
    assert up.published == ["r001"]


async def test_an_unreadable_spool_line_goes_whole_to_the_dead_letter_topic(tmp_path):
    spool = Spool(tmp_path)
    good = encode_event(event(1))
    spool.append([b"{not an event", b"{broken carrier\t" + good, encode_event(event(2))])
    spool.close()
    up = StandInBroker(down=False)
    settings = ServiceSettings()
    publisher = make_publisher(up, CollectorRegistry(), spool=Spool(tmp_path))
    await publisher.start()
    async with asyncio.timeout(10):
        while len(up.published) + len(up.dead_letters) < 3:
            await asyncio.sleep(0.01)
    await publisher.drain(timeout_s=1)
    assert up.published == ["r002"]
    first, second = (letter for _, letter in up.dead_letters)
    assert event_address(settings, first)[0].endswith("dlq.v1")
    assert {topic for topic, _ in up.dead_letters} == {event_address(settings, first)[0]}
    assert (first.original, first.offset) == (b"{not an event", 0)
    assert (second.original, second.offset) == (b"{broken carrier\t" + good, 14)
    assert {first.source_topic, second.source_topic} == {"gateway.spool"}
    assert first.error_kind not in ("", "undecodable_trace_context")
    assert second.error_kind == "undecodable_trace_context"
    assert Spool(tmp_path).pending_bytes == 0


async def test_a_quarantined_spool_sets_unreadable_lines_aside_and_never_dead_letters(tmp_path):
    spool = Spool(tmp_path)
    spool.append([b"{redacted prompt text that no longer decodes", encode_event(event(1))])
    spool.close()
    up = StandInBroker(down=False)
    aside = tmp_path / "unreadable.jsonl"
    publisher = make_publisher(up, CollectorRegistry(), spool=Spool(tmp_path),
                               queue="review", unreadable=quarantine(aside))
    await publisher.start()
    async with asyncio.timeout(10):
        while not up.published:
            await asyncio.sleep(0.01)
    await publisher.drain(timeout_s=1)
    assert up.published == ["r001"]
    assert up.dead_letters == []
    assert aside.read_bytes() == b"{redacted prompt text that no longer decodes\n"


class FlakyOnce(StandInBroker):
    """Refuses the first attempt to publish one chosen event, and only that."""

    def __init__(self, refuse) -> None:
        super().__init__(down=False)
        self.refuse = refuse
        self.outcomes: list[str] = []

    async def publish(self, event, context=None):
        await asyncio.sleep(0)
        if event is self.refuse:
            self.refuse = None
            raise ConnectionError("that one batch failed")
        self.outcomes.append(event.labels[0])


async def test_a_failed_publish_never_lets_a_later_event_of_the_request_overtake_it():
    first = OutcomeReported(request_id="r1", labels=("first",))
    later = [OutcomeReported(request_id="r1", labels=(f"later-{i}",)) for i in range(3)]
    other = OutcomeReported(request_id="r2", labels=("another-request",))
    broker = FlakyOnce(refuse=first)
    publisher = make_publisher(broker, CollectorRegistry())
    await publisher.start()
    for event in (first, *later, other):
        publisher.offer(event)
    async with asyncio.timeout(10):
        while len(broker.outcomes) < 5:
            await asyncio.sleep(0.01)
    await publisher.drain(timeout_s=1)
    of_r1 = [label for label in broker.outcomes if label != "another-request"]
    assert of_r1 == ["first", "later-0", "later-1", "later-2"]
    assert broker.outcomes.index("another-request") < broker.outcomes.index("first"), (
        "another request's events do not wait for the retry")
