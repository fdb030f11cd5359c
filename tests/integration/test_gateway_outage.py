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
                    finally:
                        broker.resume()
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
    for records in (decisions, observations):
        by_request: dict[str, set] = defaultdict(set)
        for record in records:
            event = decode_event(record.value)
            by_request[event.request_id].add(event.event_id)
        assert set(by_request) == set(sent), "every request's event arrived"
        assert all(len(ids) == 1 for ids in by_request.values()), (
            "repeats only ever carry the same event_id"
        )
