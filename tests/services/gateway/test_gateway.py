"""The gateway on loopback, driven by the official OpenAI SDK, against a fake upstream."""

import json
import logging
import time

import httpx
import openai
import pytest
from prometheus_client import generate_latest

from routemesh.contracts import CompletionObserved, OutcomeReported, RouteDecided, encode_event
from routemesh.services.router import CachingEncoder, Router
from routemesh.services.runtime.telemetry import JsonFormatter
from tests.services.gateway.conftest import JSON, reconfigure

CANARY = "CANARY-gw-5e1d77"


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-client-key", max_retries=0)


def only(events, kind, timeout_s=5.0):
    """The one event of ``kind``; a streamed request's observation is offered only after
    the last byte went out, so it may trail the client by a moment."""
    deadline = time.monotonic() + timeout_s
    while not any(isinstance(e, kind) for e in events) and time.monotonic() < deadline:
        time.sleep(0.01)
    (event,) = [e for e in events if isinstance(e, kind)]
    return event


def test_a_chat_completion_is_routed_forwarded_and_observed(client, gateway, behaviour):
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "what is the capital of spain"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from the upstream."
    assert raw.headers["x-routemesh-route"] == "lite"
    assert raw.headers["x-routemesh-reason"] == "semantic"
    assert behaviour.requests[0]["model"] == "small-model"
    decision = only(gateway.publisher.events, RouteDecided)
    observation = only(gateway.publisher.events, CompletionObserved)
    assert decision.request_id == observation.request_id == raw.headers["x-routemesh-request-id"]
    assert (observation.upstream_status, observation.total_tokens) == (200, 18)
    assert observation.finish_reason == "stop"
    assert observation.stream is False
    metric = gateway.state.registry.get_sample_value
    assert metric("routemesh_gateway_tokens_total",
                  {"route": "lite", "kind": "prompt"}) == observation.prompt_tokens
    assert metric("routemesh_gateway_tokens_total",
                  {"route": "lite", "kind": "completion"}) == observation.completion_tokens
    assert metric("routemesh_gateway_upstream_responses_total",
                  {"route": "lite", "status_class": "2xx"}) == 1


def test_streaming_is_relayed_chunk_by_chunk_with_usage(client, gateway, behaviour):
    behaviour.content = "one two three four"
    stream = client.chat.completions.create(
        model="deep", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "prove it"}],
    )
    deltas = [c.choices[0].delta.content for c in stream
              if c.choices and c.choices[0].delta.content]
    assert deltas == ["one ", "two ", "three ", "four"]
    assert behaviour.requests[0]["model"] == "large-model"
    observation = only(gateway.publisher.events, CompletionObserved)
    assert observation.stream is True
    assert observation.total_tokens == 8
    assert observation.finish_reason == "stop"
    assert observation.ttft_ms is not None
    assert observation.ttft_ms <= observation.duration_ms


def test_tool_calls_are_relayed_and_observed(client, gateway, behaviour):
    behaviour.tool_call = True
    completion = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "look it up"}],
        tools=[{"type": "function", "function": {"name": "lookup", "parameters": {}}}],
    )
    assert completion.choices[0].message.tool_calls[0].function.name == "lookup"
    decision = only(gateway.publisher.events, RouteDecided)
    assert (decision.route_id, decision.reason) == ("deep", "rule")
    observation = only(gateway.publisher.events, CompletionObserved)
    assert observation.tools_requested
    assert observation.tools_used
    assert observation.finish_reason == "tool_calls"


def test_the_override_header_an_alias_and_passthrough(client, gateway, behaviour):
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-routemesh-route": "deep"},
    )
    assert (raw.headers["x-routemesh-route"], raw.headers["x-routemesh-reason"]) == (
        "deep", "override")
    client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    raw = client.chat.completions.with_raw_response.create(
        model="some-vendor-model", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-routemesh-reason"] == "passthrough"
    assert [r["model"] for r in behaviour.requests] == [
        "large-model", "small-model", "some-vendor-model"]


def test_a_clients_request_id_is_a_correlation_field_never_the_mesh_id(gateway):
    """Two requests sharing a client id are two requests: each gets the mesh's own id
    (the audit writer's key), and each decision carries the client's id beside it."""
    ids = []
    for _ in range(2):
        response = httpx.post(f"{gateway.url}/v1/chat/completions",
                              headers={"x-request-id": "client-req-42"},
                              json={"model": "auto",
                                    "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200
        ids.append(response.headers["x-routemesh-request-id"])
    decisions = gateway.publisher.of(RouteDecided)
    assert [d.request_id for d in decisions] == ids
    assert len(set(ids)) == 2
    assert "client-req-42" not in ids
    assert [d.client_request_id for d in decisions] == ["client-req-42"] * 2
    observations = gateway.publisher.of(CompletionObserved)
    assert [o.request_id for o in observations] == ids


@pytest.mark.parametrize("given", ["has space", "x" * 129, "semi;colon"])
def test_a_request_id_that_is_no_id_is_refused_naming_the_header(gateway, given):
    response = httpx.post(f"{gateway.url}/v1/route", headers={"x-request-id": given},
                          json={"input": "hi"})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("x-request-id:")
    assert gateway.publisher.events == []


def test_upstream_5xx_is_retried(client, gateway, behaviour):
    behaviour.fail_statuses = [503, 500]
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
    assert len(behaviour.requests) == 3


def test_upstream_failure_after_retries_is_a_502(client, gateway, behaviour):
    behaviour.fail_statuses = [503, 503, 503]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502
    assert info.value.body["type"] == "upstream_error"
    observation = only(gateway.publisher.events, CompletionObserved)
    assert (observation.upstream_status, observation.error_class) == (503, "upstream_503")
    assert gateway.state.registry.get_sample_value(
        "routemesh_gateway_upstream_responses_total", {"route": "lite", "status_class": "5xx"}) == 1


def test_a_stalled_upstream_is_a_504(client, gateway, behaviour):
    behaviour.stall_s = 3
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 504
    observation = only(gateway.publisher.events, CompletionObserved)
    assert (observation.upstream_status, observation.error_class) == (None, "read_timeout")
    assert gateway.state.registry.get_sample_value(
        "routemesh_gateway_upstream_responses_total",
        {"route": "lite", "status_class": "none"}) == 1


def test_an_unreachable_upstream_is_a_502(gateway):
    reconfigure(gateway, upstream_base_url="http://127.0.0.1:9/v1")
    response = httpx.post(f"{gateway.url}/v1/chat/completions",
                          json={"model": "auto", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"
    observation = only(gateway.publisher.events, CompletionObserved)
    assert (observation.upstream_status, observation.error_class) == (None, "connect_error")


@pytest.mark.parametrize(
    ("content", "status", "code", "says"),
    [
        (b"{not json", 400, "invalid_json", "malformed JSON"),
        (b'{"model": "auto"}', 400, "invalid_body", "messages"),
        (b'{"model": "auto", "messages": []}', 400, "invalid_body", "messages"),
        (b'[1, 2]', 400, "invalid_body", "invalid request body"),
        (b'{"messages": [{"role": "user", "content": "' + b"x" * 30_000 + b'"}]}', 413,
         "body_too_large", "20000 bytes"),
    ],
)
def test_bad_bodies_get_openai_shaped_errors(gateway, content, status, code, says):
    response = httpx.post(f"{gateway.url}/v1/chat/completions", content=content,
                          headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert says in error["message"]
    assert error["type"] == "invalid_request_error"


def test_an_unknown_override_route_is_a_400(gateway):
    response = httpx.post(f"{gateway.url}/v1/chat/completions",
                          headers={"x-routemesh-route": "nowhere"},
                          json={"messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unknown_route"


def test_route_models_and_outcomes(gateway):
    decided = httpx.post(f"{gateway.url}/v1/route", json={"input": "tell me a joke about cats"})
    assert decided.status_code == 200
    assert decided.json()["type"] == "RouteDecided"
    assert decided.json()["route_id"] == "lite"
    models = httpx.get(f"{gateway.url}/v1/models").json()
    assert {"auto", "lite", "deep", "fast"} <= {m["id"] for m in models["data"]}
    accepted = httpx.post(f"{gateway.url}/v1/outcomes", json={
        "request_id": decided.json()["request_id"], "correct_route": True, "quality_score": 0.9,
        "completion_time_s": 12.5})
    assert accepted.status_code == 202
    outcome = only(gateway.publisher.events, OutcomeReported)
    assert (outcome.quality_score, outcome.completion_time_s) == (0.9, 12.5)
    bad = httpx.post(f"{gateway.url}/v1/outcomes", json={"request_id": "r", "quality_score": 2})
    assert bad.status_code == 400
    assert "quality_score" in bad.json()["error"]["message"]
    assert httpx.post(f"{gateway.url}/v1/route", json={}).status_code == 400


def test_the_canary_reaches_no_event_log_or_metric(client, gateway, behaviour, caplog):
    caplog.set_level(logging.DEBUG)
    behaviour.content = f"completion {CANARY}"
    client.chat.completions.create(
        model="auto",
        messages=[{"role": "system", "content": f"system {CANARY}"},
                  {"role": "user", "content": f"user {CANARY}"},
                  {"role": "assistant", "content": None, "tool_calls": [{
                      "id": "t1", "type": "function",
                      "function": {"name": "f", "arguments": json.dumps({"q": CANARY})}}]},
                  {"role": "tool", "tool_call_id": "t1", "content": f"result {CANARY}"},
                  {"role": "user", "content": f"and now {CANARY}"}],
        tools=[{"type": "function", "function": {"name": "f", "description": CANARY,
                                                 "parameters": {}}}],
    )
    list(client.chat.completions.create(
        model="auto", stream=True, messages=[{"role": "user", "content": CANARY}]))
    httpx.post(f"{gateway.url}/v1/chat/completions", content=b'{"x": "' + CANARY.encode(),
               headers=JSON)
    deadline = time.monotonic() + 30
    while len(gateway.publisher.events) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(gateway.publisher.events) == 4
    for event in gateway.publisher.events:
        assert CANARY.encode() not in encode_event(event)
        assert b"sk-upstream-secret-123" not in encode_event(event)
    # Formatted as production does: fields passed with ``extra=`` are not in caplog.text.
    formatter = JsonFormatter("gateway")
    logged = "\n".join(formatter.format(record) for record in caplog.records)
    assert logged
    assert CANARY not in logged
    assert CANARY not in generate_latest(gateway.state.registry).decode()
    spans = gateway.spans.get_finished_spans()
    assert {"POST /v1/chat/completions", "routemesh.decide", "routemesh.upstream"} <= {
        span.name for span in spans}
    for span in spans:
        assert CANARY not in span.to_json()


def test_openapi_document_lists_the_endpoints(gateway):
    document = httpx.get(f"{gateway.url}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/route", "/v1/models", "/v1/outcomes"} <= set(
        document["paths"])
    body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    ref = body["content"]["application/json"]["schema"]["$ref"]
    schema = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["required"] == ["messages"]
    assert schema["properties"]["stream"]["type"] == "boolean"


def test_a_client_that_disconnects_mid_stream_cancels_the_upstream_call(gateway, behaviour):
    behaviour.content = " ".join(f"w{i}" for i in range(100))
    behaviour.chunk_delay_s = 0.1
    body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "go"}]}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body) as response:
        next(response.iter_raw())
    deadline = time.monotonic() + 8
    while behaviour.streams_cut_short == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert behaviour.streams_cut_short == 1, "the upstream stream was not cancelled"
    observation = only(gateway.publisher.events, CompletionObserved)
    assert observation.stream is True
    assert observation.finish_reason is None


def test_a_repeated_prompt_comes_from_the_embedding_cache(gateway):
    router = gateway.state.router
    encoder = CachingEncoder(router.encoder, size=16)
    router.encoder.calls.clear()
    gateway.state.router = Router(router.loaded, router.matcher, encoder, instance="cached")
    metric = gateway.state.registry.get_sample_value
    assert metric("routemesh_gateway_embedding_cache_misses_total") == 0
    routes = [httpx.post(f"{gateway.url}/v1/route", json={"input": text}).json()["route_id"]
              for text in ("tell me a joke about cats", "tell me a joke about cats",
                           "prove that sqrt two is irrational")]
    assert routes == ["lite", "lite", "deep"]
    assert router.encoder.calls == [1, 1], "the repeated text was not encoded again"
    assert metric("routemesh_gateway_embedding_cache_hits_total") == 1
    assert metric("routemesh_gateway_embedding_cache_misses_total") == 2
    assert metric("routemesh_gateway_embedding_cache_entries") == 2
