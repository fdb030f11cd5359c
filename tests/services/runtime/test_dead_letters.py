"""Dead letters keep their original whole, even one larger than a Kafka message may be."""

import hashlib
from types import SimpleNamespace

import pytest
from aiokafka.errors import MessageSizeTooLargeError
from prometheus_client import CollectorRegistry

from routemesh.services.runtime.kafka import DeadLetters


def record(value: bytes):
    return SimpleNamespace(value=value, headers=[("h", b"v")], key=b"k",
                           topic="routemesh.route.decisions.v1", partition=3, offset=41)


def letters(tmp_path, publish=None, max_bytes=1024):
    return DeadLetters(publish, "unit", CollectorRegistry(), spill_dir=tmp_path / "dl",
                       max_bytes=max_bytes)


def test_a_small_original_travels_whole(tmp_path):
    letter = letters(tmp_path).letter(b"garbage", source_topic="t", partition=0, offset=1,
                                      kind="invalid_json", error="x")
    assert (letter.original, letter.truncated, letter.original_size) == (b"garbage", False, 7)
    assert letter.original_sha256 is None
    assert not (tmp_path / "dl").exists()


def test_a_large_original_is_stored_whole_and_the_event_carries_its_start(tmp_path):
    original = bytes(range(256)) * 20
    letter = letters(tmp_path).letter(original, source_topic="t", partition=0, offset=1,
                                      kind="invalid_json", error="x")
    digest = hashlib.sha256(original).hexdigest()
    assert letter.truncated
    assert letter.original == original[:1024]
    assert (letter.original_size, letter.original_sha256) == (len(original), digest)
    assert (tmp_path / "dl" / f"{digest}.bin").read_bytes() == original


async def test_a_broker_with_a_smaller_limit_gets_a_shorter_copy(tmp_path):
    sent = []

    async def publish(letter):
        if len(letter.original) > 100:
            raise MessageSizeTooLargeError()
        sent.append(letter)

    dead = letters(tmp_path, publish, max_bytes=4096)
    await dead.send(record(b"x" * 10_000), "group", "invalid_json", "bad")
    (letter,) = sent
    assert len(letter.original) <= 100
    assert letter.truncated
    assert (letter.partition, letter.offset, letter.consumer_group) == (3, 41, "group")


async def test_a_broker_that_refuses_even_a_tiny_copy_is_an_error(tmp_path):
    async def publish(letter):
        raise MessageSizeTooLargeError()

    with pytest.raises(MessageSizeTooLargeError):
        await letters(tmp_path, publish, max_bytes=4096).send(record(b"y" * 5000), None,
                                                              "invalid_json", "bad")
