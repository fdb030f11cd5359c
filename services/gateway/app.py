"""The HTTP front door: an OpenAI-compatible proxy and a decision API.

Every request gets a decision from the router core; the decision and the observation of
the upstream call are offered to the publisher, never awaited. Nothing of the prompt or
the completion reaches an event, a log line, a metric or a span.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from routemesh.contracts import Event, OutcomeReported, RouteDecided
from routemesh.services.gateway.auth import ApiKeys
from routemesh.services.gateway.completion_stats import CompletionStats
from routemesh.services.gateway.dispatch import Dispatched, Dispatcher
from routemesh.services.gateway.review import Excerpt, redacted_capture, write_raw_local
from routemesh.services.gateway.settings import GatewaySettings
from routemesh.services.gateway.upstream import UpstreamStreamError, upstream_failed
from routemesh.services.router import Router, RouteRequest, UnknownRouteError

log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Any = None


class ChatCompletionBody(BaseModel):
    """The fields the gateway reads; every other OpenAI field is forwarded as is."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[_Message] = Field(min_length=1)
    stream: bool = False


class RouteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[_Message] | None = None
    input: str | None = None
    model: str | None = None


class OutcomeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=128)
    completed: bool | None = None
    correct_route: bool | None = None
    expected_route: str | None = Field(default=None, max_length=64)
    quality_score: float | None = Field(default=None, ge=0, le=1)
    labels: list[str] = Field(default=[], max_length=16)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def error_response(status: int, message: str, type_: str, code: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "code": code}}, status_code=status
    )


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "routemesh_gateway_requests_total", "Requests by route, reason and status class",
            ["endpoint", "route", "reason", "status_class"], registry=registry,
        )
        self.decision = Histogram(
            "routemesh_gateway_decision_seconds", "Decision latency", ["layer"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25),
        )
        self.upstream = Histogram(
            "routemesh_gateway_upstream_seconds", "Upstream call duration", ["route"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "routemesh_gateway_auth_failures_total", "Requests refused for a bad API key",
            registry=registry,
        )
        self.ttft = Histogram(
            "routemesh_gateway_upstream_ttft_seconds", "Time to the first streamed byte",
            ["route"], registry=registry,
        )


class Publisher(Protocol):
    def offer(self, event: Event) -> None: ...


@dataclass
class GatewayState:
    settings: GatewaySettings
    # Swapped whole by a reload; a request reads it once and keeps that router.
    router: Router
    dispatcher: Dispatcher
    publisher: Publisher
    registry: CollectorRegistry
    keys: ApiKeys | None = None
    # The service's provider; None is the global one (tests, embedding).
    tracer_provider: trace.TracerProvider | None = None
    # Redacted review captures: a queue and spool of their own, never the events' ones.
    review_publisher: Publisher | None = None

    def __post_init__(self) -> None:
        self.metrics = _Metrics(self.registry)
        self.tracer = trace.get_tracer("routemesh.gateway", tracer_provider=self.tracer_provider)


class _ApiKeyMiddleware:
    """Refuses /v1/ requests without a valid key. Plain ASGI rather than
    ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware wraps every request in an
    extra task and memory streams, a visible share of the gateway's CPU at load
    (bench/gateway.py)."""

    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = self.state.keys
        if (
            keys is not None
            and scope["type"] == "http"
            and scope["path"].startswith("/v1/")
            and not keys.allows(Headers(scope=scope).get("authorization"))
        ):
            self.state.metrics.auth_failures.inc()
            refusal = error_response(401, "invalid or missing API key",
                                     "invalid_request_error", "invalid_api_key")
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body over {limit} bytes", "invalid_request_error",
                       "body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body over {limit} bytes", "invalid_request_error",
                           "body_too_large")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"malformed JSON: {exc}", "invalid_request_error",
                       "invalid_json") from None


def _validate(model: type[BaseModel], data: Any) -> BaseModel:
    try:
        return model.model_validate(data)
    except Exception as exc:
        errors = getattr(exc, "errors", lambda: [])()
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg')}"
            for e in errors
        ) or str(exc)
        raise ApiError(400, f"invalid request body: {detail}", "invalid_request_error",
                       "invalid_body") from None


async def _body(request: Request, model: type[BaseModel], limit: int) -> tuple[Any, Any]:
    """The JSON body (size-limited) and its validated form; ApiError on either failing."""
    data = await _read_json(request, limit)
    return data, _validate(model, data)


def _documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body the handler reads itself (to give OpenAI-shaped errors)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id")
    return given if given and _REQUEST_ID.match(given) else str(uuid.uuid4())


def _route_headers(decision: RouteDecided) -> dict[str, str]:
    return {
        "x-routemesh-request-id": decision.request_id,
        "x-routemesh-route": decision.route_id,
        "x-routemesh-reason": decision.reason,
    }


def create_app(state: GatewayState) -> FastAPI:
    app = FastAPI(
        title="routemesh gateway",
        version="1.0.0",
        description="OpenAI-compatible proxy that routes each request to a model tier.",
        # FastAPI's own OpenTelemetry: one server span per HTTP request (method and route
        # template, never bodies); decide, upstream and publish spans hang under it.
        # Operation spans would add four spans a request for nothing we read; metrics are
        # Prometheus'; its logs record exception messages, which may quote a body.
        telemetry={
            "tracer_provider": state.tracer_provider,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
            "exclude": lambda scope: scope.get("path") in ("/openapi.json", "/docs"),
        },
    )
    app.add_middleware(_ApiKeyMiddleware, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        state.metrics.requests.labels(request.url.path, "", "", f"{exc.status // 100}xx").inc()
        return error_response(exc.status, exc.message, exc.type, exc.code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", extra={"path": request.url.path})
        return error_response(500, "internal error", "server_error", "internal_error")

    async def decide(router: Router, body: dict[str, Any], request: Request) -> RouteDecided:
        override = request.headers.get("x-routemesh-route")
        started = time.perf_counter()
        with state.tracer.start_as_current_span("routemesh.decide") as span:
            try:
                decision = await router.adecide(
                    RouteRequest.from_body(body, override), _request_id(request)
                )
            except UnknownRouteError as exc:
                raise ApiError(400, str(exc), "invalid_request_error", "unknown_route") from None
            span.set_attribute("routemesh.route", decision.route_id)
            span.set_attribute("routemesh.reason", decision.reason)
        state.metrics.decision.labels(decision.layer).observe(time.perf_counter() - started)
        state.publisher.offer(decision)
        return decision

    def capture(decision: RouteDecided, data: dict[str, Any]) -> None:
        settings = state.settings
        if settings.review_capture == "off":
            return
        excerpt = Excerpt.of(RouteRequest.from_body(data).messages, settings.review_max_chars)
        if excerpt is None:
            return
        if settings.review_capture == "redacted":
            if state.review_publisher is not None:
                state.review_publisher.offer(redacted_capture(decision, excerpt))
        else:
            write_raw_local(settings.review_dir, decision, excerpt)

    def count(decision: RouteDecided, status: int) -> None:
        state.metrics.requests.labels("chat", decision.route_id, decision.reason,
                                      f"{status // 100}xx").inc()

    def answer(decision: RouteDecided, dispatched: Dispatched, stream: bool,
               tools_requested: bool, started: float) -> Response:
        """The client's response to a request whose upstream answer is complete (or
        never came), and its observation."""
        stats = CompletionStats.of_body(dispatched.body) if dispatched.body else None
        state.publisher.offer(dispatched.observation(
            decision, stream=stream, tools_requested=tools_requested, started=started,
            stats=stats))
        state.metrics.upstream.labels(decision.route_id).observe(time.perf_counter() - started)
        failure = dispatched.failure
        if failure is not None:
            status = 504 if failure.timed_out else 502
            count(decision, status)
            return error_response(
                status, f"upstream unavailable: {failure}", "upstream_error",
                "upstream_timeout" if failure.timed_out else "upstream_unavailable",
            )
        assert dispatched.status is not None
        assert dispatched.body is not None
        status, body = dispatched.status, dispatched.body
        if upstream_failed(status):
            body = json.dumps({"error": {
                "message": f"upstream failed with {status} after retries",
                "type": "upstream_error", "code": "upstream_error"}}).encode()
            status = 502
        count(decision, status)
        return Response(body, status_code=status, headers=_route_headers(decision),
                        media_type="application/json")

    @app.post(
        "/v1/chat/completions",
        openapi_extra=_documented_body(ChatCompletionBody),
    )
    async def chat_completions(request: Request) -> Response:
        data, parsed = await _body(request, ChatCompletionBody, state.settings.max_body_bytes)
        # One router for the whole request: a reload swapping ``state.router`` while this
        # request waits for the encoder must not give it another config's routes.
        router = state.router
        decision = await decide(router, data, request)
        capture(decision, data)
        stream = bool(parsed.stream)
        tools_requested = bool(data.get("tools") or data.get("functions"))
        started = time.perf_counter()
        if not stream:
            dispatched = await state.dispatcher.complete(router, decision, data)
            return answer(decision, dispatched, False, tools_requested, started)
        dispatched = await state.dispatcher.open_stream(router, decision, data)
        response = dispatched.stream
        if response is None:
            return answer(decision, dispatched, True, tools_requested, started)

        async def relay() -> AsyncIterator[bytes]:
            stats, first, error = CompletionStats(), None, None
            try:
                async for chunk in response.chunks():
                    if first is None:
                        first = time.perf_counter() - started
                        state.metrics.ttft.labels(decision.route_id).observe(first)
                    stats.feed(chunk)
                    yield chunk
            except UpstreamStreamError as exc:
                error = str(exc)
            finally:
                # Also reached when the client goes away: closing cancels the upstream call.
                response.close()
                state.publisher.offer(dispatched.observation(
                    decision, stream=True, tools_requested=tools_requested, started=started,
                    stats=stats, ttft_s=first, error_class=error))
                state.metrics.upstream.labels(decision.route_id).observe(
                    time.perf_counter() - started)

        count(decision, 200)
        return StreamingResponse(relay(), media_type="text/event-stream",
                                 headers=_route_headers(decision))

    @app.post(
        "/v1/route",
        openapi_extra=_documented_body(RouteBody),
    )
    async def route(request: Request) -> Response:
        data, parsed = await _body(request, RouteBody, state.settings.max_body_bytes)
        if not parsed.messages and parsed.input is None:
            raise ApiError(400, "invalid request body: give messages or input",
                           "invalid_request_error", "invalid_body")
        decision = await decide(state.router, data, request)
        state.metrics.requests.labels("route", decision.route_id, decision.reason, "2xx").inc()
        return Response(msgspec.json.encode(decision), media_type="application/json",
                        headers=_route_headers(decision))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        router = state.router
        names = list(router.aliases) + [r.id for r in router.config.routes]
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "routemesh"}
            for name in dict.fromkeys(names)
        ]}

    @app.post(
        "/v1/outcomes",
        status_code=202,
        openapi_extra=_documented_body(OutcomeBody),
    )
    async def outcomes(request: Request) -> dict[str, str]:
        _, parsed = await _body(request, OutcomeBody, state.settings.max_body_bytes)
        event = OutcomeReported(
            request_id=parsed.request_id,
            completed=parsed.completed,
            correct_route=parsed.correct_route,
            expected_route=parsed.expected_route,
            quality_score=parsed.quality_score,
            labels=tuple(label[:64] for label in parsed.labels if label),
        )
        state.publisher.offer(event)
        return {"status": "accepted", "event_id": str(event.event_id)}

    return app

