"""The scorer as a real process behind a real gateway, on the real broker: 2,000 requests
from a shipped eval set, outcomes with the true routes for 60 % of them (some hours late
by their timestamps), a SIGKILL mid-stream, and the published per-route accuracy equal to
the accuracy computed offline from the same data."""

import asyncio
import json
import random
import signal
import time
from collections import defaultdict
from datetime import timedelta

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from routemesh.contracts import OutcomeReported, RouteScores, decode_event, encode_event
from routemesh.contracts.events import utc_now
from routemesh.contracts.topics import ROUTE_OUTCOMES, ROUTE_SCORES
from tests.integration.conftest import (
    EXAMPLE_CONFIG,
    start_gateway,
    start_service,
    wait_until_ready,
)
from tests.services.gateway.conftest import Behaviour, Served, fake_upstream

pytestmark = [pytest.mark.broker, pytest.mark.model, pytest.mark.slow]
EVAL = EXAMPLE_CONFIG.with_suffix(".eval.jsonl")
REQUESTS = 2000


def start_scorer(settings, tmp_path):
    return start_service("scorer", settings, tmp_path,
                         ROUTEMESH_ROUTER_CONFIG=str(EXAMPLE_CONFIG),
                         ROUTEMESH_SCORER_STATE_DIR=str(tmp_path / "scorer"),
                         ROUTEMESH_SCORER_SNAPSHOT_INTERVAL_S="0.2",
                         ROUTEMESH_SCORER_PUBLISH_INTERVAL_S="0.5")


async def ask(client: httpx.AsyncClient, items: list[dict], answers: dict) -> None:
    for item in items:
        messages = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
        response = await client.post("/v1/chat/completions",
                                     json={"model": "auto", "messages": messages})
        assert response.status_code == 200, response.text
        answers[response.headers["x-routemesh-request-id"]] = (
            response.headers["x-routemesh-route"], item["route"])


async def report(settings, outcomes: list[OutcomeReported]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        for outcome in outcomes:
            await producer.send(settings.topic(ROUTE_OUTCOMES), encode_event(outcome),
                                key=outcome.request_id.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def latest_scores(settings, window_s: float, outcomes: int,
                        timeout_s: float = 120) -> RouteScores:
    """The newest RouteScores of the window once it counts every outcome."""
    topic = settings.topic(ROUTE_SCORES)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    deadline = time.monotonic() + timeout_s
    newest = None
    try:
        while not consumer.partitions_for_topic(topic):
            await consumer.topics()
            assert time.monotonic() < deadline, "no scores topic"
            await asyncio.sleep(0.5)
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        while True:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    event = decode_event(record.value)
                    if event.window_seconds == window_s:
                        newest = event
            if newest is not None and newest.outcomes >= outcomes:
                return newest
            assert time.monotonic() < deadline, newest
    finally:
        await consumer.stop()


async def test_published_accuracy_equals_the_offline_figure_through_a_sigkill(settings,
                                                                             tmp_path):
    items = [json.loads(line) for line in EVAL.read_text().splitlines() if line.strip()]
    rng = random.Random(11)
    with Served(fake_upstream(Behaviour())) as upstream:
        gateway, port, gateway_metrics, gateway_log = start_gateway(
            settings, tmp_path, f"{upstream.url}/v1", ROUTEMESH_AUTH_ENABLED="false")
        scorer, metrics, log = start_scorer(settings, tmp_path)
        try:
            await wait_until_ready(gateway_metrics, gateway, gateway_log)
            await wait_until_ready(metrics, scorer, log)
            answers: dict[str, tuple[str, str]] = {}
            asked = [items[i % len(items)] for i in range(REQUESTS)]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                         timeout=60) as client:
                await asyncio.gather(*(ask(client, asked[k::8], answers) for k in range(8)))
            assert len(answers) == REQUESTS
            now = utc_now()
            outcomes = [
                OutcomeReported(request_id=request_id, expected_route=truth,
                                correct_route=served == truth, source="test",
                                occurred_at=now + timedelta(hours=rng.choice([0, 0, 1, 3, 6])))
                for request_id, (served, truth) in answers.items() if rng.random() < 0.6
            ]
            half = len(outcomes) // 2
            await report(settings, outcomes[:half])
            scorer.send_signal(signal.SIGKILL)
            scorer.wait(10)
            scorer, metrics, log = start_scorer(settings, tmp_path)
            await report(settings, outcomes[half:])
            await wait_until_ready(metrics, scorer, log)
            scores = await latest_scores(settings, 24 * 3600, len(outcomes))
        finally:
            for process in (gateway, scorer):
                process.send_signal(signal.SIGTERM)
            gateway.wait(30)
            assert scorer.wait(30) == 0, log.read_text()

    per_route: dict[str, list[bool]] = defaultdict(list)
    for outcome in outcomes:
        served, truth = answers[outcome.request_id]
        per_route[served].append(served == truth)
    assert (scores.decisions, scores.outcomes) == (REQUESTS, len(outcomes))
    published = {r.route_id: r for r in scores.routes}
    for route, results in per_route.items():
        assert published[route].outcomes == len(results)
        assert round(published[route].accuracy, 3) == round(sum(results) / len(results), 3)
    assert round(scores.accuracy, 3) == round(
        sum(sum(r) for r in per_route.values()) / len(outcomes), 3)
    served = [s for s, _ in answers.values()]
    for route in published.values():
        assert route.capture_rate == pytest.approx(served.count(route.route_id) / REQUESTS,
                                                   abs=1e-6)
