"""routebank.changes.v1 on a real broker: `routemesh bank build --announce` publishes the
bank it built; a running gateway reads the topic itself (no consumer group), reloads for
a new bank, and not for old announcements replayed from the start of the topic."""

import asyncio
import re
import signal
import subprocess
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from routemesh.contracts import DeadLetter, RouteBankPublished, decode_event, encode_event
from routemesh.contracts.topics import DLQ, ROUTEBANK_CHANGES
from routemesh.services.runtime.embedded_broker import free_port
from tests.integration.conftest import (
    CLI,
    EXAMPLE_CONFIG,
    cli_env,
    read_topic,
    start_gateway,
    wait_until_ready,
)

pytestmark = [pytest.mark.broker, pytest.mark.model]
RELOADS = re.compile(
    r'^routemesh_gateway_config_reloads_total\{result="ok",trigger="routebank_changes"\} (\S+)$',
    re.M,
)


def announced(sha256: str, ago: timedelta = timedelta()) -> bytes:
    return encode_event(RouteBankPublished(
        collection="lite-deep", route_bank_sha256=sha256, encoder="local:all-MiniLM-L6-v2",
        utterances=10, routes=("lite", "deep"), occurred_at=datetime.now(UTC) - ago,
    ))


async def test_a_gateway_reloads_for_a_new_bank_without_a_consumer_group(settings, tmp_path):
    topic = settings.topic(ROUTEBANK_CHANGES)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    groups_before = {g[0] for g in await admin.list_consumer_groups()}
    # History from before this gateway existed: read, and not acted on.
    await producer.send_and_wait(topic, announced("a" * 64, ago=timedelta(hours=2)))
    process, _, metrics, log = start_gateway(settings, tmp_path, "http://127.0.0.1:9/v1",
                                                ROUTEMESH_AUTH_ENABLED="false")
    try:
        await wait_until_ready(metrics, process, log)
        await producer.send_and_wait(topic, announced("b" * 64))
        # A message the gateway cannot read, after both: once its dead letter exists, the
        # gateway has handled everything before it (a partition is read in order), the
        # reload included, which builds a router and may take long on a loaded machine.
        await producer.send_and_wait(topic, b"not an event")
        (letter,) = await read_topic(settings, settings.topic(DLQ), 1, timeout_s=180)
        metrics_text = httpx.get(f"http://127.0.0.1:{metrics}/metrics").text
        groups_after = {g[0] for g in await admin.list_consumer_groups()}
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 20)
        await producer.stop()
        await admin.close()
    assert code == 0, log.read_text()

    dead = decode_event(letter.value)
    assert isinstance(dead, DeadLetter)
    assert (dead.source_topic, dead.offset) == (topic, 2)
    assert dead.consumer_group is None
    assert dead.original == b"not an event"
    reloads = RELOADS.search(metrics_text)
    assert reloads is not None, metrics_text
    assert float(reloads.group(1)) == 1.0, "the old announcement must not reload"
    assert not {g for g in groups_after - groups_before if "gateway" in g}


def bank_build(settings, tmp_path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "bank", "build", "--config", str(EXAMPLE_CONFIG),
         "--qdrant-path", str(tmp_path / "qdrant"), "--announce"],
        env=cli_env(settings, **env), capture_output=True, text=True, timeout=600,
    )


async def test_bank_build_announces_the_bank_it_built(settings, tmp_path):
    built = await asyncio.to_thread(bank_build, settings, tmp_path)
    assert built.returncode == 0, built.stderr
    (record,) = await read_topic(settings, settings.topic(ROUTEBANK_CHANGES), 1)
    event = decode_event(record.value)
    assert isinstance(event, RouteBankPublished)
    assert f"route_bank_sha256 {event.route_bank_sha256}" in built.stdout
    assert event.routes == ("lite", "deep")
    assert event.utterances > 0
    assert event.encoder.startswith("local:all-MiniLM-L6-v2")


async def test_bank_build_says_when_it_could_not_announce(settings, tmp_path):
    unreachable = f"127.0.0.1:{free_port()}"
    built = await asyncio.to_thread(bank_build, settings, tmp_path,
                                    ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS=unreachable)
    assert built.returncode != 0
    assert "route_bank_sha256" in built.stdout, "the bank itself was built"
    assert "the bank is written, but announcing it failed" in built.stderr
    assert "Traceback" not in built.stderr
