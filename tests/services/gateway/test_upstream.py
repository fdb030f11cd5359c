"""What the gateway promises about its upstream calls, checked at a fake upstream that
records every request's headers and arrival."""

import json

import httpx
import openai
import pytest
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from routemesh.contracts import CompletionObserved
from tests.services.gateway.conftest import Behaviour, Served, fake_upstream
from tests.services.gateway.test_gateway import only
from tests.services.router.conftest import CONFIG

ASK = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}


@pytest.mark.parametrize("statuses", [[429, 503], [500, 502]])
def test_429_and_5xx_are_retried_with_a_growing_backoff(gateway, behaviour, statuses):
    behaviour.fail_statuses = list(statuses)
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=ASK, timeout=30)
    assert response.status_code == 200
    assert len(behaviour.requests) == 3
    first, second = (b - a for a, b in zip(behaviour.arrivals, behaviour.arrivals[1:],
                                           strict=False))
    assert first >= 0.1, "the first retry waits its backoff"
    assert second >= 0.2, "and the second waits longer"


def test_a_4xx_is_not_retried(gateway, behaviour):
    behaviour.fail_statuses = [400]
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=ASK, timeout=30)
    assert response.status_code == 400
    assert len(behaviour.requests) == 1


def test_nothing_is_retried_once_a_stream_has_started(gateway, behaviour):
    behaviour.content = "one two three four five"
    behaviour.break_streams = True
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions",
                      json={**ASK, "stream": True}, timeout=30) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    contents = [json.loads(e[6:]) for e in events]
    assert contents[0]["choices"][0]["delta"]["content"] == "one ", "the partial stream"
    assert contents[-1]["error"]["code"] == "upstream_stream_error", "then an error"
    assert len(behaviour.requests) == 1, "the upstream saw one call"
    observation = only(gateway.publisher.events, CompletionObserved)
    assert observation.error_class == "disconnected"


def test_the_upstream_is_called_with_the_configured_key(gateway, behaviour):
    httpx.post(f"{gateway.url}/v1/chat/completions", json=ASK, timeout=30)
    (headers,) = behaviour.headers
    assert headers["authorization"] == "Bearer sk-upstream-secret-123"


@pytest.fixture
def other_upstream():
    behaviour = Behaviour(content="from the deep upstream")
    with Served(fake_upstream(behaviour)) as served:
        served.behaviour = behaviour
        yield served


@pytest.fixture
def gateway_config(other_upstream, monkeypatch) -> str:
    monkeypatch.setenv("DEEP_UPSTREAM_KEY", "sk-deep-only-456")
    return CONFIG.replace(
        "    threshold: 0.45\n",
        "    threshold: 0.45\n"
        f"    upstream_base_url: {other_upstream.url}/v1\n"
        "    upstream_api_key_env: DEEP_UPSTREAM_KEY\n", 1)


def test_a_routes_own_upstream_and_key_serve_that_route_only(
    gateway, behaviour, other_upstream
):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="k", max_retries=0)
    deep = client.chat.completions.create(model="deep", messages=ASK["messages"])
    lite = client.chat.completions.create(model="lite", messages=ASK["messages"])
    assert deep.choices[0].message.content == "from the deep upstream"
    assert lite.choices[0].message.content == "Hello from the upstream."
    (deep_headers,) = other_upstream.behaviour.headers
    (lite_headers,) = behaviour.headers
    assert deep_headers["authorization"] == "Bearer sk-deep-only-456"
    assert lite_headers["authorization"] == "Bearer sk-upstream-secret-123"
    assert [r["model"] for r in other_upstream.behaviour.requests] == ["large-model"]


def test_a_clients_traceparent_is_continued(gateway):
    trace_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736
    headers: dict[str, str] = {}
    parent = trace.NonRecordingSpan(trace.SpanContext(
        trace_id, 0x00F067AA0BA902B7, is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED)))
    TraceContextTextMapPropagator().inject(headers, trace.set_span_in_context(parent))
    gateway.spans.clear()
    httpx.post(f"{gateway.url}/v1/chat/completions", json=ASK, headers=headers, timeout=30)
    spans = gateway.spans.get_finished_spans()
    assert {"routemesh.decide", "routemesh.upstream"} <= {s.name for s in spans}
    assert {s.context.trace_id for s in spans} == {trace_id}
