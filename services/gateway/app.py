"""The HTTP front door: an OpenAI-compatible proxy and a decision API.

Every request gets a decision from the router core; the decision and the observation of
the upstream call are offered to the publisher, never awaited. Nothing of the prompt or
the completion reaches an event, a log line, a metric or a span.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from routemesh.contracts import CompletionObserved, OutcomeReported, RouteDecided
from routemesh.services.gateway.auth import ApiKeys
from routemesh.services.gateway.gates import failed_gate
from routemesh.services.gateway.publisher import EventPublisher
from routemesh.services.gateway.review import redacted_capture, write_raw_local
from routemesh.services.gateway.settings import GatewaySettings
from routemesh.services.gateway.upstream import (
    Upstream,
    UpstreamResponse,
    UpstreamStreamError,
    UpstreamUnavailable,
)
from routemesh.services.router.cascade import RouteRequest, UnknownRouteError
from routemesh.services.router.config import RouteConfig

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


@dataclass
class GatewayState:
    settings: GatewaySettings
    router: Any
    upstream: Upstream
    publisher: EventPublisher
    registry: CollectorRegistry
    keys: ApiKeys | None = None
    # The service's provider; None is the global one (tests, embedding).
    tracer_provider: trace.TracerProvider | None = None

    def __post_init__(self) -> None:
        self.metrics = _Metrics(self.registry)
        self.tracer = trace.get_tracer("routemesh.gateway", tracer_provider=self.tracer_provider)


class _ApiKeyMiddleware:
    """Refuses /v1/ requests without a valid key. Plain ASGI rather than
    ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware wraps every request in an
    extra task and memory streams, which cost about a tenth of the gateway's CPU at load."""

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


class _StreamStats:
    """Reads the relayed SSE stream for finish reason, usage and tool calls, without
    keeping any content."""

    def __init__(self) -> None:
        self.buffer = b""
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.tools_used = False

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            try:
                event = json.loads(line[5:])
            except ValueError:
                continue
            _note_completion(self, event, delta=True)


def _note_completion(stats: Any, body: Any, delta: bool) -> None:
    if not isinstance(body, dict):
        return
    if isinstance(body.get("usage"), dict):
        stats.usage = body["usage"]
    for choice in body.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason"):
            stats.finish_reason = choice["finish_reason"]
        message = choice.get("delta" if delta else "message") or {}
        if isinstance(message, dict) and message.get("tool_calls"):
            stats.tools_used = True


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

    async def decide(body: dict[str, Any], request: Request) -> RouteDecided:
        override = request.headers.get("x-routemesh-route")
        started = time.perf_counter()
        with state.tracer.start_as_current_span("routemesh.decide") as span:
            try:
                decision = await state.router.adecide(
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
        mode = state.settings.review_capture
        if mode == "off":
            return
        messages = RouteRequest.from_body(data).messages
        if mode == "redacted":
            state.publisher.offer(redacted_capture(decision, messages))
        else:
            write_raw_local(state.settings.review_dir, decision, messages)

    def upstream_for(route: RouteConfig | None) -> tuple[str, str | None]:
        current = state.settings
        if route is not None and route.upstream_base_url:
            # The config names the variable; the key itself lives only in the environment.
            key_env = route.upstream_api_key_env
            return route.upstream_base_url, os.environ.get(key_env) if key_env else None
        key = current.upstream_api_key.get_secret_value() if current.upstream_api_key else None
        return current.upstream_base_url, key

    def observe(decision: RouteDecided, stream: bool, tools_requested: bool, started: float,
                status: int | None, stats: Any = None, ttft: float | None = None,
                error: str | None = None, path: tuple[str, ...] = (),
                why: str | None = None) -> None:
        usage = (stats.usage if stats else None) or {}
        state.publisher.offer(CompletionObserved(
            request_id=decision.request_id,
            route_id=decision.route_id,
            target_model=path[-1] if path else decision.target_model,
            upstream_status=status,
            duration_ms=(time.perf_counter() - started) * 1000,
            ttft_ms=ttft * 1000 if ttft is not None else None,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            total_tokens=usage.get("total_tokens"),
            finish_reason=stats.finish_reason if stats else None,
            tools_requested=tools_requested,
            tools_used=bool(stats and stats.tools_used),
            stream=stream,
            error_class=error,
            escalation_path=path or (decision.target_model,),
            escalation_reason=why,
        ))
        state.metrics.upstream.labels(decision.route_id).observe(time.perf_counter() - started)

    async def attempt(route: RouteConfig | None, model: str,
                      data: dict[str, Any]) -> UpstreamResponse | UpstreamUnavailable:
        base_url, api_key = upstream_for(route)
        with state.tracer.start_as_current_span("routemesh.upstream") as span:
            span.set_attribute("routemesh.target_model", model)
            try:
                return await state.upstream.open(
                    base_url, api_key, json.dumps(dict(data, model=model)).encode()
                )
            except UpstreamUnavailable as exc:
                return exc

    def failed(outcome: UpstreamResponse | UpstreamUnavailable) -> bool:
        return isinstance(outcome, UpstreamUnavailable) or (
            outcome.status_code >= 500 or outcome.status_code == 429
        )

    @app.post(
        "/v1/chat/completions",
        openapi_extra=_documented_body(ChatCompletionBody),
    )
    async def chat_completions(request: Request) -> Response:
        data, parsed = await _body(request, ChatCompletionBody, state.settings.max_body_bytes)
        decision = await decide(data, request)
        capture(decision, data)
        routes = {r.id: r for r in state.router.config.routes}
        route = routes.get(decision.route_id)
        stream = bool(parsed.stream)
        tools_requested = bool(data.get("tools") or data.get("functions"))
        headers = _route_headers(decision)
        started = time.perf_counter()
        path, why = [decision.target_model], None

        outcome = await attempt(route, decision.target_model, data)
        if failed(outcome) and route is not None and route.fallback_route:
            if isinstance(outcome, UpstreamResponse):
                outcome.close()
            route = routes[route.fallback_route]
            path.append(route.target_model)
            why = "upstream_failure"
            outcome = await attempt(route, route.target_model, data)

        def unavailable(failure: UpstreamUnavailable) -> Response:
            observe(decision, stream, tools_requested, started, None, error=str(failure),
                    path=tuple(path), why=why)
            status = 504 if failure.timed_out else 502
            state.metrics.requests.labels("chat", decision.route_id, decision.reason,
                                          f"{status // 100}xx").inc()
            return error_response(
                status, f"upstream unavailable: {failure}", "upstream_error",
                "upstream_timeout" if failure.timed_out else "upstream_unavailable",
            )

        if isinstance(outcome, UpstreamUnavailable):
            return unavailable(outcome)
        response = outcome
        if response.status_code >= 400 or not stream:
            try:
                body = await response.read()
            except UpstreamStreamError as exc:
                return unavailable(exc)
            status = response.status_code
            escalate = route.escalate_to if route is not None and why is None else None
            if status < 400 and escalate:
                with contextlib.suppress(ValueError):
                    why = failed_gate(data, json.loads(body), route.gates)
                if why is not None:
                    stronger = routes[escalate]
                    path.append(stronger.target_model)
                    second = await attempt(stronger, stronger.target_model, data)
                    if isinstance(second, UpstreamResponse):
                        with contextlib.suppress(UpstreamStreamError):
                            second_body = await second.read()
                            if second.status_code < 400:
                                body, status = second_body, second.status_code
            stats = _StreamStats()
            with contextlib.suppress(ValueError):
                _note_completion(stats, json.loads(body), delta=False)
            error = None if status < 400 else f"upstream_{status}"
            observe(decision, stream, tools_requested, started, status, stats, error=error,
                    path=tuple(path), why=why)
            if status >= 500 or status == 429:
                body = json.dumps({"error": {
                    "message": f"upstream failed with {status} after retries",
                    "type": "upstream_error", "code": "upstream_error"}}).encode()
                status = 502
            state.metrics.requests.labels("chat", decision.route_id, decision.reason,
                                          f"{status // 100}xx").inc()
            return Response(body, status_code=status, headers=headers,
                            media_type="application/json")

        async def relay() -> AsyncIterator[bytes]:
            stats, first = _StreamStats(), None
            error = None
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
                observe(decision, True, tools_requested, started, response.status_code,
                        stats, first, error, path=tuple(path), why=why)

        state.metrics.requests.labels("chat", decision.route_id, decision.reason, "2xx").inc()
        return StreamingResponse(relay(), media_type="text/event-stream", headers=headers)

    @app.post(
        "/v1/route",
        openapi_extra=_documented_body(RouteBody),
    )
    async def route(request: Request) -> Response:
        data, parsed = await _body(request, RouteBody, state.settings.max_body_bytes)
        if not parsed.messages and parsed.input is None:
            raise ApiError(400, "invalid request body: give messages or input",
                           "invalid_request_error", "invalid_body")
        decision = await decide(data, request)
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

