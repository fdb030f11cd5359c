"""`routemesh serve gateway` as a real process: real broker, real encoder, real HTTP.
Every request's decision and observation reach Kafka, in one trace, without the prompt."""

import hashlib
import os
import signal

import httpx
import pytest

from routemesh.contracts import CompletionObserved, RouteDecided, decode_event
from routemesh.contracts.topics import LLM_OBSERVATIONS, ROUTE_DECISIONS
from tests.integration.conftest import read_topic, start_gateway, wait_until_ready
from tests.services.gateway.conftest import Behaviour, Served, fake_upstream

pytestmark = [pytest.mark.broker, pytest.mark.model]
CANARY = "CANARY-gw-kafka-42"


async def test_the_gateway_publishes_decisions_and_observations_to_kafka(settings, tmp_path):
    behaviour = Behaviour(content=f"the answer is {CANARY}")
    with Served(fake_upstream(behaviour)) as upstream:
        process, port, metrics, log = start_gateway(
            settings, tmp_path, f"{upstream.url}/v1",
            ROUTEMESH_UPSTREAM_API_KEY="sk-upstream-key-777",
            ROUTEMESH_AUTH_KEY_SHA256=hashlib.sha256(b"client-key-1").hexdigest(),
        )
        try:
            await wait_until_ready(metrics, process, log)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                headers={"authorization": "Bearer client-key-1"},
            ) as client:
                response = await client.post("/v1/chat/completions", json={
                    "model": "auto",
                    "messages": [{"role": "user", "content":
                                  f"prove that there are infinitely many primes {CANARY}"}],
                })
            assert response.status_code == 200, response.text
            request_id = response.headers["x-routemesh-request-id"]
            decisions = await read_topic(settings, settings.topic(ROUTE_DECISIONS), 1)
            observations = await read_topic(settings, settings.topic(LLM_OBSERVATIONS), 1)
            metrics_text = httpx.get(f"http://127.0.0.1:{metrics}/metrics").text
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(20)
    assert code == 0, log.read_text()

    (decision_record,), (observation_record,) = decisions, observations
    decision = decode_event(decision_record.value)
    observation = decode_event(observation_record.value)
    assert isinstance(decision, RouteDecided)
    assert isinstance(observation, CompletionObserved)
    assert decision.request_id == observation.request_id == request_id
    assert decision.route_id == "deep"
    assert decision_record.key == request_id.encode()
    trace_ids = {
        dict(r.headers)["traceparent"].split(b"-")[1] for r in (decision_record, observation_record)
    }
    assert len(trace_ids) == 1, "one trace from the HTTP request through both events"
    for text in (decision_record.value, observation_record.value, log.read_bytes(),
                 metrics_text.encode()):
        assert CANARY.encode() not in text
        assert b"sk-upstream-key-777" not in text
    assert 'routemesh_gateway_requests_total{endpoint="chat"' in metrics_text
    assert os.path.getsize(log) > 0
