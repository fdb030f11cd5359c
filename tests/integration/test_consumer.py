"""The consumer runtime against the real broker: at-least-once with dedup across a
SIGKILL mid-batch, a poison pill to the DLQ, and a held offset that survives a rebalance
between two instances."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from routemesh.contracts import RouteDecided, decode_event, encode_event
from routemesh.contracts.topics import DLQ, ROUTE_DECISIONS
from routemesh.services.runtime.embedded_broker import free_port
from tests.integration.conftest import cli_env, read_topic, wait_until_ready

pytestmark = pytest.mark.broker
SERVICE = Path(__file__).with_name("batch_service.py")
ROOT = Path(__file__).resolve().parents[2]
GROUP = "batch-sample"


def decision(request_id: str) -> RouteDecided:
    return RouteDecided(request_id=request_id, route_id="lite", target_model="m",
                        reason="rule", layer="rules")


def start(settings, out: Path, instance: str, **extra: str):
    metrics = free_port()
    log = out.parent / f"{instance}.log"
    env = cli_env(settings, ROUTEMESH_BATCH_OUT=str(out), ROUTEMESH_INSTANCE_ID=instance,
                  ROUTEMESH_METRICS_HOST="127.0.0.1", ROUTEMESH_METRICS_PORT=str(metrics),
                  PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get(
                      "PYTHONPATH", "")) if p), **extra)
    with log.open("ab") as sink:
        process = subprocess.Popen([sys.executable, str(SERVICE)], env=env, stdout=sink,
                                   stderr=subprocess.STDOUT)
    return process, metrics, log


def lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


async def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def send(settings, values: list[tuple[bytes, int | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        topic = settings.topic(ROUTE_DECISIONS)
        for value, partition in values:
            await producer.send_and_wait(topic, value, partition=partition)
    finally:
        await producer.stop()


async def committed(settings) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                group_id=GROUP)
    await consumer.start()
    try:
        topic = settings.topic(ROUTE_DECISIONS)
        await consumer.topics()
        return {p: await consumer.committed(TopicPartition(topic, p))
                for p in consumer.partitions_for_topic(topic)}
    finally:
        await consumer.stop()


def stop(process: subprocess.Popen, log: Path) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()[-2000:]


async def test_a_sigkill_mid_batch_loses_nothing_and_repeats_no_effect(settings, tmp_path):
    out = tmp_path / "out"
    events = [decision(f"r{i:04d}") for i in range(600)]
    await send(settings, [(encode_event(e), i % 6) for i, e in enumerate(events)])
    # Each batch takes a while before its effect is durable, and the kill comes while one
    # is delivered and not yet durable: mid-batch, whatever the machine's pace.
    process, metrics, log = start(settings, out, "a", ROUTEMESH_BATCH_DELAY_S="0.5")
    try:
        await wait_for(lambda: len(lines(out / "effects.log")) >= 150
                       and len(lines(out / "delivered.log")) > len(lines(out / "effects.log")),
                       120, "a batch in flight after some effects")
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        before = len(lines(out / "effects.log"))
        assert before < len(events), "killed while work remained"
        process, metrics, log = start(settings, out, "b")
        await wait_for(lambda: len(lines(out / "effects.log")) >= len(events), 120,
                       "every effect")
        await wait_until_ready(metrics, process, log)
    finally:
        stop(process, log)
    effects = [line[2] for line in lines(out / "effects.log")]
    assert sorted(effects) == sorted(str(e.event_id) for e in events), "each exactly once"
    delivered = [line[2] for line in lines(out / "delivered.log")]
    assert len(delivered) > len(set(delivered)), "the crash made the broker deliver again"


async def test_a_poison_pill_goes_to_the_dlq_and_the_consumer_moves_on(settings, tmp_path):
    out = tmp_path / "out"
    await send(settings, [(b"\x00 not an event", 0), (encode_event(decision("after")), 0)])
    process, _, log = start(settings, out, "a")
    try:
        await wait_for(lambda: any(line[1] == "after" for line in lines(out / "effects.log")),
                       60, "the event after the pill")
        (letter,) = [decode_event(r.value)
                     for r in await read_topic(settings, settings.topic(DLQ), 1)]
        offsets = await committed(settings)
    finally:
        stop(process, log)
    assert (letter.original, letter.error_kind) == (b"\x00 not an event", "invalid_json")
    assert (letter.partition, letter.offset, letter.consumer_group) == (0, 0, GROUP)
    assert offsets[0] == 2, "committed past both"


async def test_a_held_offset_survives_a_rebalance_between_two_instances(settings, tmp_path):
    out = tmp_path / "out"
    held = decision("hold-me")
    values = [(encode_event(held), 4)]
    values += [(encode_event(decision(f"r{i}")), i % 6) for i in range(60)]
    await send(settings, values)
    first, _, first_log = start(settings, out, "a")
    second = second_log = None
    try:
        await wait_for(lambda: len(lines(out / "effects.log")) >= 60, 60, "the first pass")
        deadline = time.monotonic() + 60
        while (await committed(settings)).get(5) != 10:
            assert time.monotonic() < deadline, "partition 5 committed its 10 events"
            await asyncio.sleep(0.2)
        assert (await committed(settings))[4] == 0, "held at the held event"

        second, _, second_log = start(settings, out, "b")
        # After the rebalance, whoever owns partition 4 is handed the held event again:
        # its commit never passed it.
        await wait_for(lambda: sum(line[1] == "hold-me" for line in lines(out / "delivered.log"))
                       >= 2, 120, "the held event delivered again after the rebalance")
        assert (await committed(settings))[4] == 0
        await send(settings, [(encode_event(decision("late")), 4)])
        await wait_for(lambda: any(line[1] == "late" for line in lines(out / "effects.log")),
                       60, "an event after the held one")
    finally:
        stop(first, first_log)
        if second is not None:
            stop(second, second_log)
    assert (await committed(settings))[4] == 0, "still held after both stopped"
    owners = {line[0] for line in lines(out / "delivered.log")}
    assert owners == {"a", "b"}, "both instances took part"
