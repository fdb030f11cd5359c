"""The publisher across an outage and a restart, with a stand-in broker object."""

import asyncio
from pathlib import Path

import pytest
from aiokafka.errors import MessageSizeTooLargeError
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from routemesh.contracts import DeadLetter, OutcomeReported, decode_event, encode_event
from routemesh.services.gateway.publisher import (
    UNPUBLISHED_FILE,
    DeadLettering,
    EventPublisher,
    Quarantine,
)
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

    async def publish(self, event, context=None, address=None):
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


def make_publisher(producer, registry, *args, set_aside=None, spill=None, **options
                   ) -> EventPublisher:
    """A publisher whose unreadable spool lines become dead letters, unless told otherwise."""
    spool = options.get("spool")
    spill = spill or (spool.path.parent if spool else Path("/nonexistent")) / "dead-letters"
    return EventPublisher(producer, ServiceSettings(), registry, *args, **options,
                          set_aside=set_aside or DeadLettering(
                              DeadLetters(None, "gateway", CollectorRegistry(),
                                          spill_dir=spill), ServiceSettings()))


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
                               queue="review", set_aside=Quarantine(aside))
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

    async def publish(self, event, context=None, address=None):
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


class Encoding(StandInBroker):
    """Encodes like the real producer, and refuses for good what is over ``limit`` bytes,
    as the broker does (MessageSizeTooLargeError)."""

    def __init__(self, limit: int = 10_000) -> None:
        super().__init__(down=False)
        self.limit = limit

    async def publish(self, event, context=None, address=None):
        if len(encode_event(event)) > self.limit:
            raise MessageSizeTooLargeError("the message is too large")
        await super().publish(event, context, address)


def unencodable(i: int) -> OutcomeReported:
    return OutcomeReported(request_id=f"r{i:03d}", labels=("\ud800",))


def oversized(i: int) -> OutcomeReported:
    return OutcomeReported(request_id=f"r{i:03d}", labels=("y" * 64,) * 16)


def set_aside_letters(spill: Path) -> list[DeadLetter]:
    lines = (spill / UNPUBLISHED_FILE).read_bytes().splitlines()
    return [decode_event(line) for line in lines]


@pytest.mark.parametrize(("bad", "kind"), [(unencodable, "unencodable"),
                                           (oversized, "refused_by_broker")])
async def test_one_unpublishable_event_is_set_aside_and_never_blocks_the_rest(
        tmp_path, bad, kind):
    broker, registry = Encoding(limit=len(encode_event(event(0))) + 20), CollectorRegistry()
    publisher = make_publisher(broker, registry, spill=tmp_path / "dl")
    await publisher.start()
    publisher.offer(event(0))
    publisher.offer(bad(1))
    for i in range(2, 40):
        publisher.offer(event(i))
    async with asyncio.timeout(10):
        while len(broker.published) < 39:
            await asyncio.sleep(0.01)
    await publisher.drain(timeout_s=1)
    assert broker.published == [f"r{i:03d}" for i in range(40) if i != 1]
    (letter,) = set_aside_letters(tmp_path / "dl")
    assert (letter.error_kind, letter.source_topic) == (kind, "routemesh.route.outcomes.v1")
    assert b"r001" in letter.original
    assert registry.get_sample_value("routemesh_gateway_publish_set_aside_total",
                                     {"queue": "events", "kind": kind}) == 1
    assert registry.get_sample_value("routemesh_gateway_published_events_total",
                                     {"queue": "events"}) == 39
    assert oct((tmp_path / "dl" / UNPUBLISHED_FILE).stat().st_mode & 0o777) == "0o600"


async def test_a_stop_spools_what_is_queued_and_sets_aside_what_cannot_be_spooled(tmp_path):
    first = make_publisher(StandInBroker(down=True), CollectorRegistry(), maxsize=50,
                           spool=Spool(tmp_path / "spool"), spill=tmp_path / "dl")
    await first.start()
    for i in range(10):
        first.offer(unencodable(i) if i == 4 else event(i))
    await first.drain(timeout_s=0.1)
    assert len(set_aside_letters(tmp_path / "dl")) == 1

    up = StandInBroker(down=False)
    second = make_publisher(up, CollectorRegistry(), spool=Spool(tmp_path / "spool"),
                            spill=tmp_path / "dl")
    await second.start()
    async with asyncio.timeout(10):
        while len(up.published) < 9:
            await asyncio.sleep(0.01)
    await second.drain(timeout_s=1)
    assert up.published == [f"r{i:03d}" for i in range(10) if i != 4]


async def test_an_oversized_event_at_the_spool_head_is_set_aside_after_a_restart(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.append([encode_event(oversized(0)), encode_event(event(1))])
    spool.close()
    broker = Encoding(limit=len(encode_event(event(1))) + 20)
    publisher = make_publisher(broker, CollectorRegistry(), spool=Spool(tmp_path / "spool"),
                               spill=tmp_path / "dl")
    await publisher.start()
    async with asyncio.timeout(10):
        while not broker.published:
            await asyncio.sleep(0.01)
    await publisher.drain(timeout_s=1)
    assert broker.published == ["r001"]
    assert [letter.error_kind for letter in set_aside_letters(tmp_path / "dl")] == [
        "refused_by_broker"]
    assert Spool(tmp_path / "spool").pending_bytes == 0


async def test_a_full_spool_has_no_room_and_drops_with_a_count(tmp_path):
    registry = CollectorRegistry()
    publisher = make_publisher(StandInBroker(down=True), registry, maxsize=1,
                               spool=Spool(tmp_path), spool_max_bytes=200)
    assert publisher.has_room
    for i in range(10):
        publisher.offer(event(i))
    assert not publisher.has_room
    dropped = registry.get_sample_value("routemesh_gateway_publish_dropped_total",
                                        {"queue": "events"})
    spooled = registry.get_sample_value("routemesh_gateway_spooled_events_total",
                                        {"queue": "events"})
    assert dropped > 0
    assert dropped + spooled + 1 == 10


async def test_a_stop_with_the_broker_up_publishes_the_spool_too(tmp_path):
    """A gateway scaled in on SIGTERM leaves no events on its volume when Kafka answers."""
    spool = Spool(tmp_path)
    spool.append([encode_event(event(i)) for i in range(20)])
    spool.close()
    up = StandInBroker(down=False)
    publisher = make_publisher(up, CollectorRegistry(), spool=Spool(tmp_path))
    await publisher.start()
    await publisher.drain(timeout_s=10)
    assert up.published == [f"r{i:03d}" for i in range(20)]
    assert Spool(tmp_path).pending_bytes == 0
