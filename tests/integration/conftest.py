"""A real Kafka-compatible broker (embedded Tansu) for the whole test session."""

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from routemesh.services.runtime.embedded_broker import EmbeddedBroker, free_port
from routemesh.services.runtime.kafka import create_topics
from routemesh.services.runtime.settings import ServiceSettings


@pytest.fixture(scope="session")
def kafka(tmp_path_factory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("kafka") / "tansu.log"
    broker = EmbeddedBroker(free_port(), log_file=log)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def own_broker(tmp_path) -> Iterator[EmbeddedBroker]:
    """A broker of the test's own, for tests that pause (SIGSTOP) it."""
    embedded = EmbeddedBroker(free_port(), log_file=tmp_path / "tansu.log")
    embedded.start()
    yield embedded
    embedded.resume()
    embedded.stop()


@pytest.fixture
async def settings(kafka: EmbeddedBroker) -> ServiceSettings:
    """Settings on the session broker with topics of their own, so tests do not mix."""
    configured = ServiceSettings(
        kafka_bootstrap_servers=kafka.bootstrap,
        kafka_idempotent_producer=False,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
        metrics_port=0,
    )
    await create_topics(configured)
    return configured


def cli_env(settings: ServiceSettings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
        ROUTEMESH_TOPIC_PREFIX=settings.topic_prefix,
        ROUTEMESH_KAFKA_IDEMPOTENT_PRODUCER="false",
    )
    env.update(extra)
    return env


CLI = [sys.executable, "-m", "routemesh.services.cli.main"]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def read_topic(settings: ServiceSettings, topic: str, count: int, timeout_s: float = 30.0):
    """Read ``count`` records from the start of ``topic`` without a consumer group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await consumer.start()
    records = []
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        assignment = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(assignment)
        await consumer.seek_to_beginning(*assignment)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(records) < count and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for part in batch.values():
                records.extend(part)
    finally:
        await consumer.stop()
    return records


EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "lite-deep.yaml"


def start_service(name: str, settings: ServiceSettings, tmp_path: Path, **extra: str):
    """`routemesh serve NAME` with metrics on a free loopback port; returns the process,
    its metrics port and its log file."""
    metrics = free_port()
    log = tmp_path / f"{name}.log"
    env = cli_env(settings, ROUTEMESH_METRICS_HOST="127.0.0.1",
                  ROUTEMESH_METRICS_PORT=str(metrics), **extra)
    with log.open("ab") as out:
        process = subprocess.Popen([*CLI, "serve", name], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    return process, metrics, log


def start_gateway(settings: ServiceSettings, tmp_path: Path, upstream_url: str, **extra: str):
    """`routemesh serve gateway` on free loopback ports with the shipped lite-deep config;
    returns the process, its HTTP and metrics ports, and its log file."""
    port = free_port()
    env = {
        "ROUTEMESH_ROUTER_CONFIG": str(EXAMPLE_CONFIG),
        "ROUTEMESH_QDRANT_PATH": str(tmp_path / "qdrant"),
        "ROUTEMESH_BANK_AUTOBUILD": "true",
        "ROUTEMESH_HTTP_HOST": "127.0.0.1",
        "ROUTEMESH_HTTP_PORT": str(port),
        "ROUTEMESH_UPSTREAM_BASE_URL": upstream_url,
        "ROUTEMESH_SPOOL_DIR": str(tmp_path / "spool"),
        **extra,
    }
    process, metrics, log = start_service("gateway", settings, tmp_path, **env)
    return process, port, metrics, log


async def wait_until_ready(metrics_port: int, process, log: Path, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as client:
        while True:
            try:
                ready = await client.get(f"http://127.0.0.1:{metrics_port}/readyz")
                if ready.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the service never became ready"
            await asyncio.sleep(0.5)
