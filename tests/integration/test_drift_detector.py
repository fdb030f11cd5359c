"""The drift detector as a real process behind a real gateway, on the real broker: a model
that starts answering with nothing is flagged once and recovers once, a config swap that
moves the traffic is reported with its cause, and SIGKILLs lose and repeat nothing."""

import asyncio
import contextlib
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from routemesh.contracts import DriftAlert, decode_event
from routemesh.contracts.topics import DRIFT_ALERTS, LLM_OBSERVATIONS, ROUTE_DECISIONS
from routemesh.services.drift_detector.service import GROUP
from tests.integration.conftest import (
    EXAMPLE_CONFIG,
    read_topic,
    start_gateway,
    start_service,
    wait_until_ready,
)
from tests.services.gateway.conftest import Behaviour, Served, fake_upstream

pytestmark = [pytest.mark.broker, pytest.mark.model]


def start_detector(settings, tmp_path: Path, config: Path = EXAMPLE_CONFIG, **extra: str):
    return start_service("drift-detector", settings, tmp_path,
                         ROUTEMESH_ROUTER_CONFIG=str(config),
                         ROUTEMESH_DRIFT_STATE_DIR=str(tmp_path / "drift"),
                         ROUTEMESH_DRIFT_SNAPSHOT_INTERVAL_S="0.2", **extra)


async def send(client: httpx.AsyncClient, model: str, n: int) -> None:
    for i in range(n):
        response = await client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": f"question {i}"}]})
        assert response.status_code == 200, response.text


async def caught_up(settings, events: int, timeout_s: float = 60.0) -> None:
    """Until the detector's group has committed ``events`` decisions and observations:
    everything it will alert about them is on the alerts topic by then."""
    topics = [settings.topic(ROUTE_DECISIONS), settings.topic(LLM_OBSERVATIONS)]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                group_id=GROUP, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(t, p) for t in topics
                      for p in consumer.partitions_for_topic(t) or ()]
        deadline = time.monotonic() + timeout_s
        while True:
            committed = [await consumer.committed(tp) or 0 for tp in partitions]
            if sum(committed) >= events:
                return
            assert time.monotonic() < deadline, f"committed {sum(committed)} of {events}"
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()


async def alerts(settings) -> list[DriftAlert]:
    """Every alert on the topic now (call once the detector has caught up)."""
    topic = settings.topic(DRIFT_ALERTS)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        found = []
        while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found += [decode_event(r.value) for r in records]
        return found
    finally:
        await consumer.stop()


def changes(found: list[DriftAlert], scope: str = "model") -> list[tuple[str, str, str]]:
    return [(a.subject, a.previous_verdict, a.verdict) for a in found if a.scope == scope]


class Mesh:
    """A gateway (in front of the fake upstream) and a drift detector, as processes."""

    def __init__(self, settings, tmp_path: Path, upstream_url: str, config: Path,
                 **detector_env: str) -> None:
        self.settings, self.tmp_path, self.config = settings, tmp_path, config
        self.detector_env = detector_env
        self.gateway, self.port, self.gateway_metrics, self.gateway_log = start_gateway(
            settings, tmp_path, upstream_url, ROUTEMESH_AUTH_ENABLED="false",
            ROUTEMESH_ROUTER_CONFIG=str(config))
        self.start_detector()

    def start_detector(self) -> None:
        self.detector, self.metrics, self.log = start_detector(
            self.settings, self.tmp_path, self.config, **self.detector_env)

    def kill_detector(self) -> None:
        self.detector.send_signal(signal.SIGKILL)
        self.detector.wait(10)
        self.start_detector()

    async def ready(self) -> None:
        await wait_until_ready(self.gateway_metrics, self.gateway, self.gateway_log)
        await wait_until_ready(self.metrics, self.detector, self.log)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}")

    def stop(self) -> int:
        """SIGTERM both; the detector's exit code."""
        for process in (self.gateway, self.detector):
            process.send_signal(signal.SIGTERM)
        self.gateway.wait(30)
        return self.detector.wait(30)


@contextlib.asynccontextmanager
async def mesh(settings, tmp_path: Path, behaviour: Behaviour,
               config: Path = EXAMPLE_CONFIG, **detector_env: str):
    with Served(fake_upstream(behaviour)) as upstream:
        running = Mesh(settings, tmp_path, f"{upstream.url}/v1", config, **detector_env)
        try:
            await running.ready()
            yield running
        finally:
            code = running.stop()
        assert code == 0, running.log.read_text()


async def test_empty_answers_from_one_model_are_one_severe_alert_then_one_recovery(
    settings, tmp_path
):
    behaviour = Behaviour()
    async with mesh(settings, tmp_path, behaviour) as running, running.client() as client:
        await asyncio.gather(send(client, "lite", 30), send(client, "deep", 30))
        behaviour.content_by_model["small-model"] = ""
        await asyncio.gather(send(client, "lite", 30), send(client, "deep", 30))
        behaviour.content_by_model.clear()
        await asyncio.gather(send(client, "lite", 30), send(client, "deep", 30))
        await caught_up(settings, 2 * 180)
        found = await alerts(settings)
        page = httpx.get(f"http://127.0.0.1:{running.metrics}/metrics").text
    assert sorted(changes(found)) == sorted([
        ("small-model", "insufficient_data", "none"),
        ("large-model", "insufficient_data", "none"),
        ("small-model", "none", "severe"),
        ("small-model", "severe", "none"),
    ])
    severe = next(a for a in found if a.verdict == "severe")
    assert "empty_response_rate" in severe.reason or "length_collapse" in severe.reason
    assert severe.config_sha256 is not None
    assert len({a.event_id for a in found}) == len(found)
    assert 'routemesh_drift_severity{scope="model",subject="small-model"} 0.0' in page
    assert 'routemesh_drift_signal{scope="model",signal="empty_response_rate",' \
           'subject="small-model"}' in page


async def test_sigkills_during_the_incident_lose_and_repeat_no_transition(settings, tmp_path):
    behaviour = Behaviour()
    async with mesh(settings, tmp_path, behaviour) as running, running.client() as client:
        await send(client, "lite", 30)
        await caught_up(settings, 2 * 30)
        behaviour.content_by_model["small-model"] = ""
        await send(client, "lite", 8)
        # Killed while the incident's first events are being judged.
        running.kill_detector()
        await send(client, "lite", 12)
        await read_topic(settings, settings.topic(DRIFT_ALERTS), 2)
        # Killed right after the severe alert went out.
        running.kill_detector()
        await running.ready()
        await send(client, "lite", 10)
        behaviour.content_by_model.clear()
        await send(client, "lite", 40)
        await caught_up(settings, 2 * 100)
        found = await alerts(settings)
    assert changes(found) == [("small-model", "insufficient_data", "none"),
                              ("small-model", "none", "severe"),
                              ("small-model", "severe", "none")]


async def test_a_config_swap_that_moves_traffic_is_reported_with_its_cause(settings, tmp_path):
    config_dir = tmp_path / "config"
    shutil.copytree(EXAMPLE_CONFIG.parent, config_dir)
    config = config_dir / EXAMPLE_CONFIG.name
    prompts = ["hi there, how are you today?",
               "prove that the square root of two is irrational, step by step"]
    async with mesh(settings, tmp_path, Behaviour(), config,
                    ROUTEMESH_DRIFT_ROUTING_WINDOW="100") as running, running.client() as client:

        async def route(n: int) -> list[str]:
            chosen = []
            for i in range(n):
                response = await client.post("/v1/route", json={"input": prompts[i % 2]})
                assert response.status_code == 200, response.text
                chosen.append(response.json()["route_id"])
            return chosen

        before = await route(200)
        # A new rule sends every short prompt to the lite route.
        config.write_text(config.read_text() + "rules:\n  - {id: short, route: lite, "
                          "when: {max_input_chars: 200}}\n")
        reloading = []
        while not reloading or reloading[-1] != "lite":
            reloading += await route(2)
            await asyncio.sleep(0.1)
        after = await route(200)
        assert before.count("deep") >= 80, "half the traffic went deep before"
        assert after.count("deep") == 0
        await caught_up(settings, len(before) + len(reloading) + len(after))
        found = await alerts(settings)
    overall = [a for a in found if a.scope == "route" and a.subject == "*"]
    flagged = [a for a in overall if a.verdict in ("mild", "severe")]
    # Severe once; as the new config's traffic enters the baseline it may ease to mild.
    assert [a.verdict for a in flagged][:1] == ["severe"]
    assert [a.verdict for a in flagged].count("severe") == 1
    shift = flagged[0]
    assert "route_share_psi" in shift.reason
    assert shift.likely_cause is not None
    assert shift.likely_cause.startswith("config changed from")
