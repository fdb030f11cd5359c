"""A broker outage while requests flow: users see no failure and, once the broker is back,
every decision and observation is on Kafka exactly once per request. The outage lasts
until the gateway has spilled events to its disk spool, however long that takes."""

import asyncio
import signal
import time
from collections import defaultdict

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from routemesh.contracts import decode_event
from routemesh.contracts.topics import LLM_OBSERVATIONS, ROUTE_DECISIONS
from routemesh.services.runtime.settings import ServiceSettings
from tests.integration.conftest import start_gateway, wait_until_ready
from tests.services.gateway.conftest import Behaviour, Served, fake_upstream

pytestmark = [pytest.mark.broker, pytest.mark.model, pytest.mark.slow]
# The outage ends once this many events went to the disk spool, and this many requests
# were answered during it.
SPOOLED_EVENTS = 40
OUTAGE_REQUESTS = 100


async def kafka_noted(client, metrics: int, reachable: bool) -> dict:
    """/readyz once its status notes Kafka as ``reachable``: the gateway serves through
    an outage, so it stays ready (200) all along and says so in its status."""
    deadline = time.monotonic() + 60
    while True:
        ready = await client.get(f"http://127.0.0.1:{metrics}/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        if body["status"]["kafka"]["ok"] is reachable:
            return body
        assert time.monotonic() < deadline, f"Kafka never noted as reachable={reachable}"
        await asyncio.sleep(0.25)


def _spooled(metrics_text: str) -> float:
    return sum(float(line.split()[-1]) for line in metrics_text.splitlines()
               if line.startswith("routemesh_gateway_spooled_events_total{"))


async def _everything(bootstrap: str, topic: str) -> list:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records = []

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in partitions])

        while await behind():
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def test_a_broker_outage_loses_and_duplicates_nothing(own_broker, tmp_path):
    broker = own_broker
    settings = ServiceSettings(kafka_bootstrap_servers=broker.bootstrap)
    sent: list[str] = []
    statuses: list[int] = []
    try:
        with Served(fake_upstream(Behaviour())) as upstream:
            gateway, port, metrics, log = start_gateway(
                settings, tmp_path, f"{upstream.url}/v1",
                ROUTEMESH_AUTH_ENABLED="false", ROUTEMESH_PUBLISH_QUEUE_SIZE="20",
            )
            try:
                await wait_until_ready(metrics, gateway, log)
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                             timeout=30) as client:

                    async def traffic(requests: int) -> None:
                        for _ in range(requests):
                            response = await client.post("/v1/chat/completions", json={
                                "model": "auto",
                                "messages": [{"role": "user", "content": f"hi #{len(sent)}"}],
                            })
                            statuses.append(response.status_code)
                            sent.append(response.headers.get("x-routemesh-request-id", ""))

                    async def spooled() -> float:
                        metrics_text = await client.get(f"http://127.0.0.1:{metrics}/metrics")
                        return _spooled(metrics_text.text)

                    await traffic(20)
                    broker.pause()
                    try:
                        await traffic(OUTAGE_REQUESTS)
                        deadline = time.monotonic() + 300
                        while await spooled() < SPOOLED_EVENTS:
                            assert time.monotonic() < deadline, "nothing reached the spool"
                            await traffic(10)
                        spooled_count = await spooled()
                        # Ready while the spool has room; the status notes Kafka away...
                        during = await kafka_noted(client, metrics, reachable=False)
                    finally:
                        broker.resume()
                    # ...and back.
                    await kafka_noted(client, metrics, reachable=True)
                    await traffic(20)

                    expected = len(sent)
                    deadline = time.monotonic() + 120
                    while time.monotonic() < deadline:
                        decisions = await _everything(broker.bootstrap,
                                                      settings.topic(ROUTE_DECISIONS))
                        observations = await _everything(broker.bootstrap,
                                                         settings.topic(LLM_OBSERVATIONS))
                        if len({r.key for r in decisions}) >= expected and len(
                            {r.key for r in observations}
                        ) >= expected:
                            break
                        await asyncio.sleep(2)
            finally:
                gateway.send_signal(signal.SIGTERM)
                gateway.wait(30)
    finally:
        broker.resume()

    assert set(statuses) == {200}, "the outage never failed a user's request"
    assert spooled_count >= SPOOLED_EVENTS, "the queue overflowed into the spool in the outage"
    assert during["ready"] is True
    assert during["status"]["kafka"] == {"ok": False, "detail": "broker did not answer"}
    assert during["checks"]["spool"] == {"ok": True, "detail": "room"}
    assert during["status"]["spooled_bytes"]["ok"] is False, "events wait on disk"
    for records in (decisions, observations):
        by_request: dict[str, list] = defaultdict(list)
        for record in records:
            event = decode_event(record.value)
            by_request[event.request_id].append(event.event_id)
        assert set(by_request) == set(sent), "every request's event arrived"
        # The outage is far shorter than the producer's request timeout: nothing was sent
        # twice, and nothing came from the spool that had reached the broker.
        assert [rid for rid, ids in by_request.items() if len(ids) != 1] == [], (
            "exactly one record per request")


async def test_sigterm_while_the_broker_is_down_spools_and_a_restart_publishes_in_order(
    own_broker, tmp_path
):
    """Stopped while the broker is down, the gateway exits 0 with its events on disk; the
    next start, with the broker back, publishes them: none lost, each request's in order,
    and /readyz stays ready while noting Kafka away."""
    broker = own_broker
    settings = ServiceSettings(kafka_bootstrap_servers=broker.bootstrap)
    sent: list[str] = []
    shutdown_s = 4
    with Served(fake_upstream(Behaviour())) as upstream:
        env = {"ROUTEMESH_AUTH_ENABLED": "false", "ROUTEMESH_PUBLISH_QUEUE_SIZE": "5",
               "ROUTEMESH_SHUTDOWN_TIMEOUT_S": str(shutdown_s)}
        gateway, port, metrics, log = start_gateway(settings, tmp_path, f"{upstream.url}/v1",
                                                    **env)
        try:
            await wait_until_ready(metrics, gateway, log)
            broker.pause()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                         timeout=30) as client:
                for i in range(30):
                    response = await client.post("/v1/chat/completions", json={
                        "model": "auto", "messages": [{"role": "user", "content": f"hi {i}"}]})
                    assert response.status_code == 200
                    sent.append(response.headers["x-routemesh-request-id"])
                await kafka_noted(client, metrics, reachable=False)
            stopped_at = time.monotonic()
            gateway.send_signal(signal.SIGTERM)
            code = gateway.wait(60)
            elapsed = time.monotonic() - stopped_at
        finally:
            broker.resume()
            if gateway.poll() is None:
                gateway.kill()
        assert code == 0, log.read_text()[-3000:]
        assert elapsed < 3 * shutdown_s, "the shutdown is bounded by its timeout"
        assert (tmp_path / "spool" / "events.jsonl").stat().st_size > 0

        gateway, port, metrics, log = start_gateway(settings, tmp_path, f"{upstream.url}/v1",
                                                    **env)
        try:
            await wait_until_ready(metrics, gateway, log)
            deadline = time.monotonic() + 120
            while True:
                decisions = await _everything(broker.bootstrap, settings.topic(ROUTE_DECISIONS))
                observations = await _everything(broker.bootstrap,
                                                 settings.topic(LLM_OBSERVATIONS))
                if {r.key.decode() for r in decisions} >= set(sent) and {
                    r.key.decode() for r in observations
                } >= set(sent):
                    break
                assert time.monotonic() < deadline, "the spooled events never arrived"
                await asyncio.sleep(1)
        finally:
            gateway.send_signal(signal.SIGTERM)
            assert gateway.wait(30) == 0
    for records in (decisions, observations):
        ids = defaultdict(set)
        for record in records:
            event = decode_event(record.value)
            ids[event.request_id].add(event.event_id)
        assert set(ids) == set(sent)
        assert all(len(v) == 1 for v in ids.values()), "a repeat is the same event"
        for partition in {r.partition for r in records}:
            order = [r.key.decode() for r in records if r.partition == partition]
            firsts = list(dict.fromkeys(order))
            assert firsts == [rid for rid in sent if rid in firsts], "in the order sent"
