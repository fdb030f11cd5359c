"""A stateful consumer restarted on a fresh broker (the embedded one keeps nothing; on
real Kafka, a topic deleted and created again) counts the new log's events instead of
skipping every offset below the one its saved state reached, and says so loudly."""

import asyncio
import signal
import time
import uuid

import httpx
import pytest

from routemesh.contracts import LayerAttempt, RouteDecided
from routemesh.contracts.topics import ROUTE_DECISIONS
from routemesh.services.runtime.embedded_broker import EmbeddedBroker, free_port
from routemesh.services.runtime.kafka import EventProducer, create_topics
from routemesh.services.runtime.settings import ServiceSettings
from tests.integration.conftest import EXAMPLE_CONFIG, start_service, wait_until_ready

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# (service, its state directory setting, the metric and labels that count decisions)
SERVICES = {
    "scorer": ("ROUTEMESH_SCORER_STATE_DIR", "routemesh_scorer_decisions",
               {"window": "24h", "scope": "all", "subject": "all"}),
    "drift-detector": ("ROUTEMESH_DRIFT_STATE_DIR", "routemesh_drift_window_samples",
                       {"scope": "route", "subject": "*"}),
}


def decision() -> RouteDecided:
    return RouteDecided(request_id=str(uuid.uuid4()), route_id="lite",
                        target_model="small-model", reason="semantic", layer="semantic",
                        score=0.9, attempts=(LayerAttempt(layer="semantic", decided=True),))


async def publish_decisions(settings: ServiceSettings, count: int) -> None:
    """As a gateway publishes them: batched, compressed, many to a batch."""
    producer = EventProducer(settings, "test")
    await producer.start()
    try:
        await asyncio.gather(*(producer.publish(decision()) for _ in range(count)))
    finally:
        await producer.stop()


async def metric(port: int, name: str, labels: dict[str, str]) -> float | None:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in
                                                  labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def counted(port: int, process, log, name, labels, expected: float) -> None:
    deadline = time.monotonic() + 120
    while (seen := await metric(port, name, labels)) != expected:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{name} is {seen}, not {expected}"
        await asyncio.sleep(0.3)


@pytest.mark.parametrize("service", list(SERVICES))
async def test_a_restart_on_a_fresh_broker_counts_the_new_log(tmp_path, service):
    state_env, name, labels = SERVICES[service]
    env = {state_env: str(tmp_path / "state"), "ROUTEMESH_ROUTER_CONFIG": str(EXAMPLE_CONFIG),
           "ROUTEMESH_SCORER_SNAPSHOT_INTERVAL_S": "0.1",
           "ROUTEMESH_SCORER_PUBLISH_INTERVAL_S": "0.3",
           "ROUTEMESH_DRIFT_SNAPSHOT_INTERVAL_S": "0.1",
           # All routing is judged every quarter window: at 25, 50 and 75 decisions.
           "ROUTEMESH_DRIFT_ROUTING_WINDOW": "100"}
    prefix = f"t{uuid.uuid4().hex[:10]}."
    first = EmbeddedBroker(free_port(), log_file=tmp_path / "first.log")
    await asyncio.to_thread(first.start)
    try:
        settings = ServiceSettings(kafka_bootstrap_servers=first.bootstrap,
                                   kafka_idempotent_producer=False, topic_prefix=prefix)
        await create_topics(settings)
        await publish_decisions(settings, 25)
        process, port, log = start_service(service, settings, tmp_path, **env)
        await wait_until_ready(port, process, log)
        await counted(port, process, log, name, labels, 25)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        # The same broker again: the saved state's log, so no new epoch.
        process, port, log = start_service(service, settings, tmp_path, **env)
        await wait_until_ready(port, process, log)
        await publish_decisions(settings, 25)
        await counted(port, process, log, name, labels, 50)
        assert await metric(port, "routemesh_consumer_partition_epochs_total",
                            {"topic": settings.topic(ROUTE_DECISIONS)}) is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert "new epoch" not in log.read_text()
    finally:
        first.stop()

    second = EmbeddedBroker(free_port(), log_file=tmp_path / "second.log")
    await asyncio.to_thread(second.start)
    try:
        settings = settings.model_copy(update={"kafka_bootstrap_servers": second.bootstrap})
        await create_topics(settings)
        await publish_decisions(settings, 25)
        process, port, log = start_service(service, settings, tmp_path, **env)
        try:
            await wait_until_ready(port, process, log)
            await counted(port, process, log, name, labels, 75)
            epochs = await metric(port, "routemesh_consumer_partition_epochs_total",
                                  {"topic": settings.topic(ROUTE_DECISIONS)})
            assert epochs is not None
            assert epochs >= 1
            async with httpx.AsyncClient() as client:
                ready = (await client.get(f"http://127.0.0.1:{port}/readyz")).json()
            (note,) = [v for k, v in ready["status"].items() if k.startswith("epochs:")]
            assert note["detail"].startswith("new epoch at")
            assert "starting a new epoch" in log.read_text()
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    finally:
        second.stop()
