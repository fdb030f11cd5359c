"""Hostile input at the HTTP edge: every malformed body is a 4xx that says what is wrong,
an unexpected error is an OpenAI-shaped 500, and the connection stays usable after
every response. The Hypothesis fuzz throws arbitrary JSON at both bodies."""

import http.client
import json
import socket
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routemesh.contracts import RouteDecided, encode_event
from tests.services.gateway.conftest import JSON
from tests.services.gateway.test_gateway import only

HI = {"role": "user", "content": "hello"}
CANARY_TEXT = "CANARY-format-4b1e9d"


class Connection:
    """One keep-alive connection: a request after a broken one would fail on it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.http = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)

    def post(self, path: str, body: bytes) -> tuple[int, dict, bytes]:
        self.http.request("POST", path, body=body,
                          headers={"content-type": "application/json"})
        response = self.http.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    def get(self, path: str) -> tuple[int, bytes]:
        self.http.request("GET", path)
        response = self.http.getresponse()
        return response.status, response.read()


@pytest.fixture
def connection(gateway):
    conn = Connection(gateway.url)
    yield conn
    conn.http.close()


def chat(**fields) -> bytes:
    return json.dumps({"model": "auto", "messages": [HI], **fields}).encode()


@pytest.mark.parametrize("path", ["/v1/route", "/v1/chat/completions"])
def test_a_lone_surrogate_is_text_like_any_other(gateway, connection, path):
    body = (b'{"input": "\\ud800 x"}' if path == "/v1/route" else
            b'{"model": "auto", "messages": [{"role": "user", "content": "\\udfff hi"}]}')
    status, _, answer = connection.post(path, body)
    assert status == 200, answer
    decision = only(gateway.publisher.events, RouteDecided)
    assert len(decision.prompt_sha256) == 64
    assert connection.get("/v1/models")[0] == 200


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"model": "auto", "messages": [], "x": ' + b"[" * 3000 + b"]" * 3000 + b"}",
         "nested too deeply"),
        (b'{"model": "auto", "temperature": NaN, "messages": [{"role": "user"}]}',
         "NaN is not a JSON number"),
        (b'{"model": "auto", "temperature": Infinity, "messages": []}', "Infinity"),
        (b'{"model": "auto", "temperature": 1e999, "messages": []}', "out of range"),
        (chat(stream="yes"), "stream: expected `bool`"),
        (chat(stream_options="usage"), "stream_options: expected `object"),
        (chat(n=0), "n: expected `int` >= 1"),
        (chat(model=5), "model: expected `str | null`"),
        (json.dumps({"model": "auto", "messages": "hi"}).encode(), "messages: expected `array`"),
        (json.dumps({"model": "auto", "messages": [{"content": "x"}]}).encode(),
         "messages[0]: object missing required field `role`"),
        (json.dumps({"model": "auto", "messages": []}).encode(), "messages: expected `array`"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"messages": ', "malformed JSON"),
    ],
)
def test_a_bad_chat_body_is_a_400_that_says_what_is_wrong(
    gateway, connection, behaviour, body, says
):
    status, _, answer = connection.post("/v1/chat/completions", body)
    assert status == 400, answer
    error = json.loads(answer)["error"]
    assert says in error["message"]
    assert error["type"] == "invalid_request_error"
    assert behaviour.requests == [], "nothing malformed is forwarded"
    assert connection.post("/v1/chat/completions", chat())[0] == 200


def test_an_unexpected_error_is_an_openai_shaped_500_on_a_connection_that_stays_usable(
    gateway, connection, monkeypatch
):
    async def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    router = gateway.state.router
    monkeypatch.setattr(router, "adecide", broken)
    status, _, answer = connection.post("/v1/route", b'{"input": "hello"}')
    assert status == 500
    assert json.loads(answer)["error"]["code"] == "internal_error"
    monkeypatch.undo()
    status, _, _ = connection.post("/v1/route", b'{"input": "hello"}')
    assert status == 200
    requests = gateway.state.registry.get_sample_value
    assert requests("routemesh_gateway_requests_total",
                    {"endpoint": "route", "route": "", "reason": "", "status_class": "5xx"}) == 1


def test_unknown_paths_and_methods_and_models_are_openai_shaped(gateway):
    missing = httpx.get(f"{gateway.url}/v2/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong = httpx.delete(f"{gateway.url}/v1/route")
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (405, "method_not_allowed")
    assert wrong.headers["allow"] == "POST"
    assert httpx.get(f"{gateway.url}/v1/models/auto").json()["id"] == "auto"
    assert httpx.get(f"{gateway.url}/v1/models/lite").json()["object"] == "model"
    unknown = httpx.get(f"{gateway.url}/v1/models/gpt-9")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "model_not_found")


def test_every_status_class_is_counted_under_one_label_per_endpoint(gateway):
    httpx.post(f"{gateway.url}/v1/route", json={"input": "hello"})
    httpx.post(f"{gateway.url}/v1/route", content=b"{", headers=JSON)
    httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "auto", "messages": [HI]})
    httpx.post(f"{gateway.url}/v1/chat/completions", content=b"{", headers=JSON)
    httpx.get(f"{gateway.url}/v1/models")
    httpx.post(f"{gateway.url}/v1/outcomes", json={"request_id": ""})
    samples = {
        (s.labels["endpoint"], s.labels["status_class"])
        for metric in gateway.state.registry.collect()
        if metric.name == "routemesh_gateway_requests"
        for s in metric.samples if s.name.endswith("_total")
    }
    assert samples == {("route", "2xx"), ("route", "4xx"), ("chat", "2xx"), ("chat", "4xx"),
                       ("models", "2xx"), ("outcomes", "4xx")}


def test_an_upstream_that_echoes_its_key_never_shows_it_to_the_client(gateway, behaviour):
    key = gateway.state.settings.upstream_api_key.get_secret_value()
    behaviour.error_message = f"invalid key {key}, please check"
    behaviour.fail_statuses = [401]
    refused = httpx.post(f"{gateway.url}/v1/chat/completions",
                         json={"model": "auto", "messages": [HI]})
    assert refused.status_code == 401
    assert key not in refused.text
    assert "[REDACTED]" in refused.text
    behaviour.content = f"my key is {key} and that is that"
    answered = httpx.post(f"{gateway.url}/v1/chat/completions",
                          json={"model": "auto", "messages": [HI]})
    assert key not in answered.text
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions",
                      json={"model": "auto", "stream": True, "messages": [HI]}) as stream:
        streamed = b"".join(stream.iter_raw())
    assert key.encode() not in streamed
    assert b"[REDACTED]" in streamed
    for event in gateway.publisher.events:
        assert key.encode() not in encode_event(event)


def test_a_stream_scrubber_catches_a_key_cut_between_pieces():
    from routemesh.services.gateway.scrub import Scrubber

    stream = Scrubber(["sk-secret-value"]).stream()
    pieces = [b'data: {"a": "sk-sec', b'ret-value"}\n\n', b"data: [DONE]\n\n"]
    relayed = b"".join(stream.feed(p) for p in pieces) + stream.flush()
    assert relayed == b'data: {"a": "[REDACTED]"}\n\ndata: [DONE]\n\n'
    assert stream.feed(b"whole line\n") == b"whole line\n", "a finished line is not held"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool", 1]),
                                 "content": json_values})
chat_bodies = st.fixed_dictionaries(
    {"messages": st.lists(message, max_size=3) | json_values},
    optional={"model": st.sampled_from(["auto", "lite", "gpt-x", 3]) | json_values,
              "stream": st.booleans() | json_values, "n": json_values,
              "stream_options": json_values, "tools": json_values},
)
route_bodies = st.fixed_dictionaries(
    {}, optional={"input": st.text(max_size=30) | json_values,
                  "messages": st.lists(message, max_size=3), "model": json_values})
surrogate = st.sampled_from([b"", b'"\\ud800"', b'"\\udfff x"'])


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(body=chat_bodies | route_bodies | json_values, nested=st.integers(0, 3000),
       path=st.sampled_from(["/v1/chat/completions", "/v1/route"]), odd=surrogate)
def test_no_body_gets_a_server_error_and_the_connection_survives_each(
    gateway, connection, body, nested, path, odd
):
    raw = json.dumps(body).encode()
    if nested > 2500:
        raw = b"[" * nested + b"]" * nested
    elif odd and raw.startswith(b"{") and raw != b"{}":
        raw = b'{"odd": ' + odd + b", " + raw[1:]
    status, _, answer = connection.post(path, raw)
    assert status < 500 or status in (502, 504), answer
    assert connection.get("/v1/models")[0] == 200


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("/v1/chat/completions", b'{"model": "\\ud800", "messages": [{"role": "user"}]}',
         "model: expected `str` of printable ASCII without spaces"),
        ("/v1/route", b'{"model": "\\udfff", "input": "hi"}', "model: expected `str`"),
        ("/v1/chat/completions", chat(model="m" * 257), "model: expected `str` of length <="),
        ("/v1/chat/completions", chat(model="has space"), "model: expected `str` of printable"),
        ("/v1/outcomes", b'{"request_id": "r1", "labels": ["ok", "\\ud800"]}',
         "labels[1]: expected `str` of text without control characters"),
        ("/v1/outcomes", json.dumps({"request_id": "r1", "labels": ["x" * 65]}).encode(),
         "labels[0]: expected `str` of length <= 64"),
        ("/v1/outcomes", b'{"request_id": "\\ud800"}', "request_id: expected `str` of letters"),
        ("/v1/outcomes", b'{"request_id": "r1", "expected_route": "a b"}', "expected_route:"),
    ],
)
def test_a_value_no_event_could_carry_is_refused_at_the_edge_naming_the_field(
    gateway, connection, path, body, says
):
    """A lone surrogate or an oversized name once made one event unpublishable, and the
    publisher retried it forever with every later event waiting behind it."""
    status, _, answer = connection.post(path, body)
    assert status == 400, answer
    assert says in json.loads(answer)["error"]["message"]
    assert gateway.publisher.events == []
    assert connection.post("/v1/route", b'{"input": "hello"}')[0] == 200


@pytest.mark.parametrize(
    ("fields", "tool_choice", "response_format"),
    [
        ({"tool_choice": CANARY_TEXT}, "other", None),
        ({"tool_choice": {"type": CANARY_TEXT}}, "other", None),
        ({"tool_choice": {"type": "function", "function": {"name": CANARY_TEXT}}},
         "function", None),
        ({"tool_choice": 7}, "other", None),
        ({"tool_choice": "required"}, "required", None),
        ({"response_format": {"type": CANARY_TEXT}}, None, "other"),
        ({"response_format": CANARY_TEXT}, None, "other"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": CANARY_TEXT}}},
         None, "json_schema"),
    ],
)
def test_format_signals_are_enumerations_never_the_clients_text(
    gateway, connection, fields, tool_choice, response_format
):
    status, _, answer = connection.post("/v1/chat/completions", chat(**fields))
    assert status == 200, answer
    decision = only(gateway.publisher.events, RouteDecided)
    assert (decision.format.tool_choice, decision.format.response_format) == (
        tool_choice, response_format)
    for event in gateway.publisher.events:
        assert CANARY_TEXT.encode() not in encode_event(event)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_body_not_declared_json_is_a_415(gateway, content_type):
    """What a browser may send cross-origin without asking first is refused."""
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{gateway.url}/v1/route", content=b'{"input": "hi"}',
                          headers=headers)
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    declared = httpx.post(f"{gateway.url}/v1/route", content=b'{"input": "hi"}',
                          headers={"content-type": "application/json; charset=utf-8"})
    assert declared.status_code == 200


def test_head_is_answered_on_every_get_endpoint(gateway):
    for path in ("/v1/models", "/v1/models/auto"):
        response = httpx.head(f"{gateway.url}{path}")
        assert (response.status_code, response.content) == (200, b"")


@pytest.mark.parametrize("head", [b"GET /v1/models HTTP/1.1\r\nx-bad: a\x7fb\r\n",
                                  b"GET /v1/mo dels HTTP/1.1\r\n"])
def test_a_request_that_is_not_valid_http_gets_an_openai_shaped_400(gateway, head):
    parts = urlsplit(gateway.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as raw:
        raw.sendall(head + b"host: x\r\n\r\n")
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400")
    assert b"content-type: application/json" in status
    assert json.loads(body)["error"]["code"] == "invalid_http"
