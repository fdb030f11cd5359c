"""A service process: ready once Kafka answers; on SIGTERM it finishes the message in
flight, commits it and exits 0 within its shutdown timeout, and it exits on SIGTERM even
while its start still waits."""

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from routemesh.contracts import RouteDecided
from routemesh.contracts.topics import ROUTE_DECISIONS
from routemesh.services.runtime.embedded_broker import EmbeddedBroker, free_port
from routemesh.services.runtime.kafka import create_broker, create_topics
from routemesh.services.runtime.settings import ServiceSettings
from tests.integration.conftest import CLI, cli_env
from tests.services.runtime.helpers import broker_publish

pytestmark = pytest.mark.broker
SAMPLE = Path(__file__).with_name("sample_service.py")
SHUTDOWN_S = 5.0


def _readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return 0, {}


async def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_sigterm_finishes_the_message_in_flight_commits_and_exits_zero(
    settings, tmp_path
):
    out = tmp_path / "sample.out"
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(SAMPLE)],
        env=cli_env(
            settings,
            ROUTEMESH_SAMPLE_OUT=str(out),
            ROUTEMESH_SAMPLE_DELAY_S="2.5",
            ROUTEMESH_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_S),
            ROUTEMESH_METRICS_PORT=str(port),
            ROUTEMESH_METRICS_HOST="127.0.0.1",
            PYTHONPATH=str(Path(__file__).resolve().parents[2]),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        await _wait_for(lambda: _readyz(port)[0] == 200, 60, "readiness")
        assert _readyz(port)[1]["checks"]["kafka"]["ok"] is True

        broker = create_broker(settings, service="producer")
        async with broker:
            await broker.start()
            await broker_publish(broker, settings)(RouteDecided(
                    request_id="in-flight", route_id="lite", target_model="m",
                    reason="rule", layer="rules",
                ),
            )
        await _wait_for(lambda: out.exists() and "start" in out.read_text(), 60, "handling")

        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=15)
        elapsed = time.monotonic() - stopped_at
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read().decode()
    assert code == 0, output
    # The shutdown budget, plus the one-second floor each of the two Kafka stops has, plus
    # the process's own exit.
    assert elapsed < SHUTDOWN_S + 3
    assert out.read_text().splitlines() == ["start in-flight", "done in-flight"]
    assert "Traceback" not in output
    for line in output.splitlines():
        json.loads(line)  # structured logs only

    topic = settings.topic(ROUTE_DECISIONS)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id="sample"
    )
    await consumer.start()
    try:
        committed = [
            await consumer.committed(TopicPartition(topic, p))
            for p in consumer.partitions_for_topic(topic)
        ]
    finally:
        await consumer.stop()
    assert sum(c or 0 for c in committed) == 1


async def test_a_service_started_before_its_broker_waits_for_it(tmp_path):
    """A pod before Kafka's, or a process beside `routemesh dev` starting its broker:
    the service says it waits, and is ready once the broker answers."""
    kafka = free_port()
    settings = ServiceSettings(kafka_bootstrap_servers=f"127.0.0.1:{kafka}",
                               topic_prefix=f"t{uuid.uuid4().hex[:8]}.")
    port = free_port()
    log = tmp_path / "writer.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*CLI, "serve", "audit-writer"], stdout=out, stderr=subprocess.STDOUT,
            env=cli_env(settings, ROUTEMESH_AUDIT_DIR=str(tmp_path / "audit"),
                        ROUTEMESH_METRICS_PORT=str(port),
                        ROUTEMESH_METRICS_HOST="127.0.0.1"))
    broker = EmbeddedBroker(kafka, log_file=tmp_path / "tansu.log")
    try:
        await _wait_for(lambda: "Kafka does not answer yet" in log.read_text(), 60,
                        "the service to say it waits")
        assert process.poll() is None, log.read_text()
        await asyncio.to_thread(broker.start)
        await create_topics(settings)
        await _wait_for(lambda: _readyz(port)[0] == 200, 120, "readiness")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()
        broker.stop()


async def test_sigterm_ends_a_service_whose_start_never_ends(settings, tmp_path):
    """A writer whose consumer group never settled (the embedded broker kept a dead
    leader) waited in its start and ignored SIGTERM: a pod would wait for its SIGKILL."""
    log = tmp_path / "sample.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(SAMPLE)], stdout=out, stderr=subprocess.STDOUT,
            env=cli_env(settings, ROUTEMESH_SAMPLE_START_HANGS="true",
                        ROUTEMESH_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_S),
                        ROUTEMESH_METRICS_PORT=str(free_port())))
    try:
        await _wait_for(lambda: "service starting" in log.read_text(), 60, "the start")
        process.send_signal(signal.SIGTERM)
        assert process.wait(SHUTDOWN_S + 10) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert "stopped while starting" in text
    assert "service running" not in text
