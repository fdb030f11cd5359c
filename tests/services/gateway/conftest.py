"""A fake OpenAI-compatible upstream and a real gateway, both on loopback."""

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import pytest
import uvicorn
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from qdrant_client import QdrantClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from routemesh.services.gateway.app import GatewayState, create_app
from routemesh.services.gateway.dispatch import Dispatcher
from routemesh.services.gateway.protocol import GatewayHttp
from routemesh.services.gateway.settings import GatewaySettings
from routemesh.services.gateway.upstream import Upstream
from routemesh.services.router.bank import build_bank, load_snapshot
from routemesh.services.router.cascade import Router
from routemesh.services.router.config import load_config
from routemesh.services.runtime.embedded_broker import free_port
from tests.services.router.conftest import CONFIG, DEEP, HashingEncoder

# Every body the gateway reads is JSON, declared as such.
JSON = {"content-type": "application/json"}


@dataclass
class Behaviour:
    """What the fake upstream does next. Tests set it; the upstream records requests."""

    fail_statuses: list[int] = field(default_factory=list)
    stall_s: float = 0.0
    content: str = "Hello from the upstream."
    tool_call: bool = False
    requests: list[dict] = field(default_factory=list)
    # Per target model: an answer to give instead of ``content``, or always failing.
    content_by_model: dict[str, str] = field(default_factory=dict)
    failing_models: set[str] = field(default_factory=set)
    chunk_delay_s: float = 0.01
    streams_cut_short: int = 0
    # The message of the error bodies answered for ``fail_statuses``.
    error_message: str = "busy"
    # Each request's headers and arrival time (monotonic), in order.
    headers: list[dict] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    # Streams break off (the connection drops) after their first chunk.
    break_streams: bool = False


def _completion(body: dict, behaviour: Behaviour) -> dict:
    content = behaviour.content_by_model.get(body["model"], behaviour.content)
    message = {"role": "assistant", "content": content}
    finish = "stop"
    if behaviour.tool_call:
        message = {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "lookup", "arguments": json.dumps({"q": behaviour.content})}}]}
        finish = "tool_calls"
    # An empty answer reports no completion tokens, as real upstreams do.
    completion_tokens = 7 if content or behaviour.tool_call else 0
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 11, "completion_tokens": completion_tokens,
                  "total_tokens": 11 + completion_tokens},
    }


def fake_upstream(behaviour: Behaviour) -> Starlette:
    async def chat(request: Request):
        body = await request.json()
        behaviour.requests.append(body)
        behaviour.headers.append(dict(request.headers))
        behaviour.arrivals.append(time.monotonic())
        if body["model"] in behaviour.failing_models:
            return JSONResponse({"error": {"message": "down", "type": "server_error"}},
                                status_code=503)
        if behaviour.fail_statuses:
            status = behaviour.fail_statuses.pop(0)
            return JSONResponse({"error": {"message": behaviour.error_message,
                                           "type": "server_error"}}, status_code=status)
        if behaviour.stall_s:
            await asyncio.sleep(behaviour.stall_s)
        if not body.get("stream"):
            return JSONResponse(_completion(body, behaviour))

        async def chunks():
            words = behaviour.content.split(" ")
            finished = False
            try:
                for i, word in enumerate(words):
                    delta = {"content": word + ("" if i == len(words) - 1 else " ")}
                    yield "data: " + json.dumps({
                        "id": "c", "object": "chat.completion.chunk", "created": 1,
                        "model": body["model"],
                        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                    }) + "\n\n"
                    await asyncio.sleep(behaviour.chunk_delay_s)
                    if behaviour.break_streams:
                        raise ConnectionResetError("the upstream broke off")
                finished = True
            finally:
                if not finished:
                    behaviour.streams_cut_short += 1
            final = {"id": "c", "object": "chat.completion.chunk", "created": 1,
                     "model": body["model"],
                     "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            if (body.get("stream_options") or {}).get("include_usage"):
                final["usage"] = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
            yield "data: " + json.dumps(final) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


class Served:
    """Run an ASGI app with uvicorn on a free loopback port, in its own thread."""

    def __init__(self, app, **config) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_config=None, lifespan="off",
                                                    **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Served":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def reconfigure(gateway, **update) -> None:
    """Change the running gateway's settings, as a restart with them would."""
    settings = gateway.state.settings.model_copy(update=update)
    gateway.state.settings = gateway.state.dispatcher.settings = settings


class CollectingPublisher:
    def __init__(self) -> None:
        self.events: list = []

    def offer(self, event) -> None:
        self.events.append(event)

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture
def behaviour() -> Behaviour:
    return Behaviour()


@pytest.fixture
def upstream(behaviour):
    with Served(fake_upstream(behaviour)) as served:
        yield served


@pytest.fixture
def gateway_config() -> str:
    return CONFIG


@pytest.fixture
def gateway(upstream, tmp_path, gateway_config):
    (tmp_path / "deep.txt").write_text(DEEP)
    (tmp_path / "routes.yaml").write_text(gateway_config)
    loaded = load_config(tmp_path / "routes.yaml")
    encoder = HashingEncoder()
    client = QdrantClient(":memory:")
    build_bank(loaded, encoder, client, "bank")
    router = Router(loaded, load_snapshot(client, "bank", loaded.config.semantic), encoder,
                    instance="gw-test")
    settings = GatewaySettings(
        upstream_base_url=f"{upstream.url}/v1", upstream_api_key="sk-upstream-secret-123",
        upstream_read_timeout_s=1.0, upstream_max_retries=2, max_body_bytes=20_000,
    )
    publisher, review = CollectingPublisher(), CollectingPublisher()
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    dispatcher = Dispatcher(settings, Upstream(1.0, 1.0, 2), tracer_provider)
    state = GatewayState(settings, router, dispatcher, publisher, CollectorRegistry(),
                         tracer_provider=tracer_provider, review_publisher=review)
    with Served(create_app(state), http=GatewayHttp) as served:
        served.publisher = publisher
        served.review = review
        served.state = state
        served.spans = spans
        yield served
