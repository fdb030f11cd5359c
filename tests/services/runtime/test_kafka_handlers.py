"""Handler logic of subscribe_events, with FastStream's in-memory TestKafkaBroker.

The same paths run against a real broker in tests/integration/test_dlq.py.
"""

import asyncio

import pytest
from faststream.kafka import KafkaMessage, TestKafkaBroker
from prometheus_client import CollectorRegistry

from routemesh.contracts import (
    DeadLetter,
    OutcomeReported,
    RouteDecided,
    decode_event,
    encode_event,
)
from routemesh.contracts.topics import DLQ, ROUTE_DECISIONS
from routemesh.services.runtime.kafka import (
    DeadLetters,
    create_broker,
    subscribe_events,
)
from routemesh.services.runtime.settings import ServiceSettings
from tests.services.runtime.helpers import broker_publish

SETTINGS = ServiceSettings(kafka_idempotent_producer=False)


def decision(request_id: str) -> RouteDecided:
    return RouteDecided(
        request_id=request_id, route_id="lite", target_model="m", reason="rule", layer="rules"
    )


@pytest.fixture
def mesh():
    registry = CollectorRegistry()
    broker = create_broker(SETTINGS, service="unit")
    handled: list[RouteDecided] = []
    dead: list[DeadLetter] = []

    async def handler(event, msg: KafkaMessage):
        if event.request_id == "boom":
            raise ValueError("cannot handle boom")
        handled.append(event)

    subscribe_events(
        broker,
        SETTINGS,
        [ROUTE_DECISIONS],
        group_id="unit",
        handler=handler,
        dead_letters=DeadLetters(broker_publish(broker, SETTINGS), "unit", registry),
    )

    @broker.subscriber(SETTINGS.topic(DLQ), group_id="dlq-reader")
    async def collect(msg: KafkaMessage):
        dead.append(decode_event(msg.body))

    return broker, handled, dead, registry


async def _settle(condition, timeout=30.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def test_valid_events_reach_the_handler(mesh):
    broker, handled, dead, _ = mesh
    async with TestKafkaBroker(broker):
        await broker_publish(broker, SETTINGS)(decision("r1"))
        await _settle(lambda: handled)
    assert [e.request_id for e in handled] == ["r1"]
    assert dead == []


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"\x00\x01 not json", "invalid_json"),
        (b'{"type": "Mystery", "schema_version": "1.0"}', "unknown_type"),
        (b'{"type": "RouteDecided", "schema_version": "1.0", "request_id": 5}', "invalid_event"),
    ],
)
async def test_bad_payloads_become_dead_letters_with_the_original_bytes(mesh, payload, kind):
    broker, handled, dead, registry = mesh
    async with TestKafkaBroker(broker):
        await broker.publish(payload, SETTINGS.topic(ROUTE_DECISIONS), key=b"k1")
        await broker_publish(broker, SETTINGS)(decision("after"))
        await _settle(lambda: dead and handled)
    (letter,) = dead
    assert letter.original == payload
    assert letter.error_kind == kind
    assert letter.source_topic == SETTINGS.topic(ROUTE_DECISIONS)
    assert letter.consumer_group == "unit"
    assert letter.key == b"k1"
    assert [e.request_id for e in handled] == ["after"]
    assert registry.get_sample_value(
        "routemesh_dlq_messages_total",
        {"service": "unit", "source_topic": letter.source_topic, "kind": kind},
    ) == 1


async def test_an_event_of_another_topic_is_dead_lettered_as_unexpected(mesh):
    broker, handled, dead, _ = mesh
    stray = OutcomeReported(request_id="r9", completed=True)
    async with TestKafkaBroker(broker):
        await broker.publish(
            encode_event(stray),
            SETTINGS.topic(ROUTE_DECISIONS),
        )
        await _settle(lambda: dead)
    assert dead[0].error_kind == "unexpected_type"
    assert handled == []


async def test_a_failing_handler_dead_letters_and_moves_on(mesh):
    broker, handled, dead, _ = mesh
    async with TestKafkaBroker(broker):
        await broker_publish(broker, SETTINGS)(decision("boom"))
        await broker_publish(broker, SETTINGS)(decision("fine"))
        await _settle(lambda: dead and handled)
    assert dead[0].error_kind == "handler_error"
    assert "cannot handle boom" in dead[0].error
    assert decode_event(dead[0].original).request_id == "boom"
    assert [e.request_id for e in handled] == ["fine"]
