"""Poison pills against a real broker: each lands in the DLQ, the consumer carries on,
and the group's committed offsets cover everything it handled."""

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from faststream.kafka import KafkaMessage
from prometheus_client import CollectorRegistry

from routemesh.contracts import RouteDecided, decode_event, encode_event
from routemesh.contracts.topics import DLQ, ROUTE_DECISIONS
from routemesh.services.runtime.kafka import (
    DeadLetters,
    RetryableError,
    create_broker,
    subscribe_events,
)
from tests.integration.conftest import read_topic
from tests.services.runtime.helpers import broker_publish

pytestmark = pytest.mark.broker


def decision(request_id: str) -> RouteDecided:
    return RouteDecided(
        request_id=request_id, route_id="lite", target_model="m", reason="rule", layer="rules"
    )


def subscribed_broker(settings, service: str, group_id: str | None, handler, **options):
    """A broker for ``service`` whose one subscriber reads route decisions."""
    registry = CollectorRegistry()
    broker = create_broker(settings, service=service)
    subscribe_events(broker, settings, [ROUTE_DECISIONS], group_id=group_id, handler=handler,
                     dead_letters=DeadLetters(broker_publish(broker, settings), service, registry),
                     **options)
    return broker


async def test_poison_pills_go_to_the_dlq_and_valid_events_after_them_are_handled(settings):
    wrong_type = encode_event(decision("wrong")).replace(b'"prompt_chars":0', b'"prompt_chars":"z"')
    poison = {
        b"\xde\xad\xbe\xef garbage": "invalid_json",
        b'{"type": "NotAnEvent", "schema_version": "1.0", "x": 1}': "unknown_type",
        wrong_type: "invalid_event",
    }
    handled: list[str] = []
    done = asyncio.Event()

    async def handler(event, msg: KafkaMessage):
        handled.append(event.request_id)
        if len(handled) == 3:
            done.set()

    broker = subscribed_broker(settings, "dlq-test", "dlq-test", handler)
    topic = settings.topic(ROUTE_DECISIONS)
    async with broker:
        await broker.start()
        # One key, so everything lands on one partition in this order.
        await broker_publish(broker, settings)(decision("before"))
        for payload in poison:
            await broker.publish(payload, topic, key=b"same-key",
                                 headers={"x-origin": "poison-test"})
        for request_id in ("after-1", "after-2"):
            await broker.publish(encode_event(decision(request_id)), topic, key=b"same-key")
        await asyncio.wait_for(done.wait(), timeout=60)

    assert sorted(handled) == ["after-1", "after-2", "before"]
    letters = [decode_event(r.value) for r in await read_topic(settings, settings.topic(DLQ), 3)]
    assert {letter.original: letter.error_kind for letter in letters} == poison
    where = {r.value: (r.partition, r.offset) for r in await read_topic(settings, topic, 6)}
    for letter in letters:
        assert letter.source_topic == topic
        assert letter.consumer_group == "dlq-test"
        assert letter.key == b"same-key"
        assert letter.error
        assert (letter.partition, letter.offset) == where[letter.original], "where it was"
        assert dict(letter.headers)["x-origin"] == b"poison-test", "its headers, as they were"
        assert letter.truncated is False
        assert letter.original_size == len(letter.original)

    committed = await _committed(settings.kafka_bootstrap_servers, "dlq-test", topic)
    ends = await _end_offsets(settings.kafka_bootstrap_servers, topic)
    assert committed == ends, "every message, poison included, is committed once handled"


async def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        result = {}
        for p in partitions:
            offset = await consumer.committed(TopicPartition(topic, p))
            result[p] = offset or 0
        return result
    finally:
        await consumer.stop()


async def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        ends = await consumer.end_offsets(partitions)
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def test_a_broadcast_consumer_retries_a_message_in_place(settings):
    """group_id=None: a RetryableError reads the same message again (there is no commit to
    hold back), and the next message is handled after it."""
    handled: list[str] = []
    done = asyncio.Event()

    async def handler(event, msg: KafkaMessage):
        handled.append(event.request_id)
        if handled == ["first"]:
            raise RetryableError("not yet")
        if len(handled) == 3:
            done.set()

    broker = subscribed_broker(settings, "broadcast-test", None, handler, retry_backoff_s=0.05)
    async with broker:
        await broker.start()
        for request_id in ("first", "second"):
            await broker.publish(encode_event(decision(request_id)),
                                 settings.topic(ROUTE_DECISIONS), key=b"same-key")
        await asyncio.wait_for(done.wait(), timeout=60)
    assert handled == ["first", "first", "second"]
