"""The HTTP front door: an OpenAI-compatible proxy and a decision API.

The edge only: routing, reading bodies (``bodies``), and mapping outcomes to responses.
The decision is the router core's, the upstream calls are ``dispatch``'s. Every request's
decision and observation are offered to the publisher, never awaited. Nothing of the
prompt or the completion reaches an event, a log line, a metric or a span.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from routemesh.contracts import Event, OutcomeReported, RouteDecided
from routemesh.services.gateway.auth import ApiKeys
from routemesh.services.gateway.bodies import (
    ApiError,
    ChatView,
    OutcomeBody,
    RouteView,
    client_request_id,
    invalid,
    openapi_body,
    read_body,
)
from routemesh.services.gateway.completion_stats import CompletionStats
from routemesh.services.gateway.dispatch import Dispatched, Dispatcher, Plan
from routemesh.services.gateway.review import (
    Excerpt,
    redacted_capture,
    write_raw_local,
    write_redacted_local,
)
from routemesh.services.gateway.scrub import Scrubber
from routemesh.services.gateway.settings import GatewaySettings
from routemesh.services.gateway.upstream import UpstreamStreamError, upstream_failed
from routemesh.services.router import (
    CachingEncoder,
    ChatBody,
    Router,
    RouteRequest,
    UnknownRouteError,
)

log = logging.getLogger(__name__)
# Where a request's decision is kept in its ASGI scope's state, for the edge's count.
DECISION = "routemesh.decision"
# The endpoint label of routemesh_gateway_requests_total: one value per endpoint, bounded.
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/route": "route", "/v1/models": "models",
             "/v1/outcomes": "outcomes"}


def endpoint_of(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "models"
    return ENDPOINTS.get(path, "other")


def error_response(status: int, message: str, type_: str, code: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}},
                        status_code=status, headers=headers)


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "routemesh_gateway_requests_total", "Requests by route, reason and status class",
            ["endpoint", "route", "reason", "status_class"], registry=registry,
        )
        self.decision = Histogram(
            "routemesh_gateway_decision_seconds", "Decision latency", ["layer"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5,
                     1.0),
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
        self.upstream_responses = Counter(
            "routemesh_gateway_upstream_responses_total",
            "Upstream answers (after retries) by status class; 'none': no answer came",
            ["route", "status_class"], registry=registry,
        )
        self.tokens = Counter(
            "routemesh_gateway_tokens_total", "Tokens the upstream reported using",
            ["route", "kind"], registry=registry,
        )
        # Registered with or without a shadow config, so dashboards and alerts find it.
        self.shadow = Counter(
            "routemesh_gateway_shadow_decisions_total",
            "Requests offered to the shadow config, by what became of them",
            ["outcome"], registry=registry,
        )

    def upstream_done(self, route: str, started: float, status: int | None,
                      stats: CompletionStats | None) -> None:
        self.upstream.labels(route).observe(time.perf_counter() - started)
        self.upstream_responses.labels(
            route, "none" if status is None else f"{status // 100}xx").inc()
        for kind in ("prompt", "completion"):
            count = stats.tokens(f"{kind}_tokens") if stats is not None else None
            if count:
                self.tokens.labels(route, kind).inc(count)


class _EmbeddingCacheCollector(Collector):
    """The embedding cache's counts, read from the router in use when scraped (the
    router core keeps plain counters; a reload that keeps the encoder keeps its cache)."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        encoder = self.state.router.encoder
        cached = encoder if isinstance(encoder, CachingEncoder) else None
        hits = CounterMetricFamily("routemesh_gateway_embedding_cache_hits",
                                   "Texts whose vector came from the embedding cache")
        misses = CounterMetricFamily("routemesh_gateway_embedding_cache_misses",
                                     "Texts the encoder had to encode")
        entries = GaugeMetricFamily("routemesh_gateway_embedding_cache_entries",
                                    "Vectors held by the embedding cache")
        hits.add_metric([], cached.hits if cached else 0)
        misses.add_metric([], cached.misses if cached else 0)
        entries.add_metric([], len(cached) if cached else 0)
        yield from (hits, misses, entries)


class Publisher(Protocol):
    def offer(self, event: Event) -> None: ...


class ShadowDecider(Protocol):
    def offer(self, request: RouteRequest, live: RouteDecided) -> None: ...


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
    # Decides each request again with the shadow config, after the live decision.
    shadow: ShadowDecider | None = None

    def __post_init__(self) -> None:
        self.metrics = _Metrics(self.registry)
        self.registry.register(_EmbeddingCacheCollector(self))
        self.tracer = trace.get_tracer("routemesh.gateway", tracer_provider=self.tracer_provider)


class _Edge:
    """Counts every response (one endpoint label per endpoint, every status class, the
    route and reason of the request's decision) and turns an unexpected error into
    an OpenAI-shaped 500 on a connection that stays usable: Starlette's own handler
    re-raises after answering, and the server then drops the connection under the client.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware
    wraps every request in an extra task and memory streams, a visible share of the
    gateway's CPU at load (bench/gateway.py)."""

    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        endpoint = endpoint_of(scope["path"])
        try:
            await self.app(scope, receive, sending)
        except Exception:
            log.exception("unexpected error", extra={"endpoint": endpoint})
            if not status:
                failure = error_response(500, "internal error", "server_error",
                                         "internal_error")
                await failure(scope, receive, sending)
        finally:
            decision = scope.get("state", {}).get(DECISION)
            route, reason = (decision.route_id, decision.reason) if decision else ("", "")
            self.state.metrics.requests.labels(endpoint, route, reason,
                                               f"{(status or 500) // 100}xx").inc()


class _ApiKeyMiddleware:
    """Refuses /v1/ requests without a valid key."""

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


def _route_headers(decision: RouteDecided) -> dict[str, str]:
    return {
        "x-routemesh-request-id": decision.request_id,
        "x-routemesh-route": decision.route_id,
        "x-routemesh-reason": decision.reason,
    }


_STREAM_BROKE_OFF = b"data: " + json.dumps({"error": {
    "message": "the upstream stream broke off; the answer is incomplete",
    "type": "upstream_error", "code": "upstream_stream_error"}}).encode() + b"\n\n"


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "routemesh"}


class Handlers:
    """One method per endpoint, and what they share."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    def extract(self, body: ChatBody, request: Request) -> RouteRequest:
        """What routing reads of the request, once; the client's id kept for correlation
        only (the mesh's request id is its own: two clients may send the same one)."""
        return RouteRequest.of(body, request.headers.get("x-routemesh-route"),
                               client_request_id(request))

    async def decide(self, router: Router, route_request: RouteRequest,
                     request: Request) -> RouteDecided:
        state = self.state
        started = time.perf_counter()
        with state.tracer.start_as_current_span("routemesh.decide") as span:
            try:
                decision = await router.adecide(route_request, str(uuid.uuid4()))
            except UnknownRouteError as exc:
                raise invalid(str(exc), "unknown_route") from None
            span.set_attribute("routemesh.route", decision.route_id)
            span.set_attribute("routemesh.reason", decision.reason)
        state.metrics.decision.labels(decision.layer).observe(time.perf_counter() - started)
        # For the edge's request count: the decision itself, not the response's headers.
        request.scope.setdefault("state", {})[DECISION] = decision
        state.publisher.offer(decision)
        if state.shadow is not None:
            state.shadow.offer(route_request, decision)
        return decision

    def capture(self, decision: RouteDecided, route_request: RouteRequest) -> None:
        settings = self.state.settings
        if settings.review_capture == "off":
            return
        excerpt = Excerpt.of(route_request.messages, settings.review_max_chars)
        if excerpt is None:
            return
        if settings.review_capture == "redacted_topic":
            if self.state.review_publisher is not None:
                self.state.review_publisher.offer(redacted_capture(decision, excerpt))
        elif settings.review_capture == "redacted":
            write_redacted_local(settings.review_dir, redacted_capture(decision, excerpt))
        else:
            write_raw_local(settings.review_dir, decision, excerpt)

    def answer(self, plan: Plan, request: RouteRequest, dispatched: Dispatched,
               scrub: Scrubber, started: float, *, stream: bool) -> Response:
        """The client's response to a request whose upstream answer is complete (or
        never came), and its observation."""
        state, decision = self.state, plan.decision
        state.publisher.offer(dispatched.observation(decision, request, stream=stream,
                                                     started=started))
        answer = dispatched.answer
        state.metrics.upstream_done(decision.route_id, started, dispatched.status,
                                    answer.stats if answer else None)
        failure = dispatched.failure
        if failure is not None:
            return error_response(
                504 if failure.timed_out else 502, f"upstream unavailable: {failure}",
                "upstream_error",
                "upstream_timeout" if failure.timed_out else "upstream_unavailable",
                headers=_route_headers(decision),
            )
        assert dispatched.status is not None
        assert answer is not None
        status, body = dispatched.status, scrub(answer.body)
        if upstream_failed(status):
            body = json.dumps({"error": {
                "message": f"upstream failed with {status} after retries",
                "type": "upstream_error", "code": "upstream_error"}}).encode()
            status = 502
        return Response(body, status_code=status, headers=_route_headers(decision),
                        media_type="application/json")

    async def chat_completions(self, request: Request) -> Response:
        state = self.state
        data, parsed = await read_body(request, ChatView, state.settings.max_body_bytes)
        route_request = self.extract(parsed, request)
        # One router for the whole request: a reload swapping ``state.router`` while this
        # request waits for the encoder must not give it another config's routes.
        router = state.router
        decision = await self.decide(router, route_request, request)
        self.capture(decision, route_request)
        plan = Plan.of(router, decision)
        scrub = Scrubber(state.dispatcher.secrets(plan))
        started = time.perf_counter()
        if not parsed.stream:
            dispatched = await state.dispatcher.complete(plan, route_request, data)
            return self.answer(plan, route_request, dispatched, scrub, started, stream=False)
        dispatched = await state.dispatcher.open_stream(plan, data)
        response = dispatched.stream
        if response is None:
            return self.answer(plan, route_request, dispatched, scrub, started, stream=True)

        async def relay() -> AsyncIterator[bytes]:
            stats, first, error = CompletionStats(), None, None
            scrubbing = scrub.stream()
            try:
                async for chunk in response.chunks():
                    if first is None:
                        first = time.perf_counter() - started
                        state.metrics.ttft.labels(decision.route_id).observe(first)
                    stats.feed(chunk)
                    yield scrubbing.feed(chunk)
                yield scrubbing.flush()
            except UpstreamStreamError as exc:
                error = str(exc)
                # Headers and part of the answer are gone already: the error can only
                # travel as a last event, the way OpenAI reports errors mid-stream.
                yield scrubbing.flush() + _STREAM_BROKE_OFF
            finally:
                # Also reached when the client goes away: closing cancels the upstream call.
                response.close()
                state.publisher.offer(dispatched.observation(
                    decision, route_request, stream=True, started=started, stats=stats,
                    ttft_s=first, error_class=error))
                state.metrics.upstream_done(decision.route_id, started, dispatched.status,
                                            stats)

        return StreamingResponse(relay(), media_type="text/event-stream",
                                 headers=_route_headers(decision))

    async def route(self, request: Request) -> Response:
        _, parsed = await read_body(request, RouteView, self.state.settings.max_body_bytes)
        decision = await self.decide(self.state.router, self.extract(parsed.body(), request),
                                     request)
        return Response(msgspec.json.encode(decision), media_type="application/json",
                        headers=_route_headers(decision))

    def _model_names(self) -> list[str]:
        router = self.state.router
        return list(dict.fromkeys([*router.aliases, *(r.id for r in router.config.routes)]))

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [_model(name) for name in self._model_names()]}

    async def model(self, model_id: str) -> JSONResponse:
        if model_id not in self._model_names():
            return error_response(404, f"The model '{model_id}' does not exist",
                                  "invalid_request_error", "model_not_found")
        return JSONResponse(_model(model_id))

    async def outcomes(self, request: Request) -> JSONResponse:
        _, parsed = await read_body(request, OutcomeBody, self.state.settings.max_body_bytes)
        event = OutcomeReported(
            request_id=parsed.request_id,
            completed=parsed.completed,
            correct_route=parsed.correct_route,
            expected_route=parsed.expected_route,
            quality_score=parsed.quality_score,
            labels=tuple(parsed.labels),
            completion_time_s=parsed.completion_time_s,
        )
        self.state.publisher.offer(event)
        return JSONResponse({"status": "accepted", "event_id": str(event.event_id)},
                            status_code=202)


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
    app.add_middleware(_Edge, state=state)
    handlers = Handlers(state)
    components: dict[str, Any] = {}
    for path, handler, view, status in (
        ("/v1/chat/completions", handlers.chat_completions, ChatView, 200),
        ("/v1/route", handlers.route, RouteView, 200),
        ("/v1/outcomes", handlers.outcomes, OutcomeBody, 202),
    ):
        body, schemas = openapi_body(view)
        components.update(schemas)
        app.add_api_route(path, handler, methods=["POST"], status_code=status,
                          openapi_extra=body)
    for method in ("GET", "HEAD"):
        schema = method == "GET"
        app.add_api_route("/v1/models", handlers.models, methods=[method],
                          include_in_schema=schema)
        app.add_api_route("/v1/models/{model_id}", handlers.model, methods=[method],
                          include_in_schema=schema)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.code)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Unknown paths and methods, OpenAI-shaped like every other error.
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, f"{exc.detail}: {request.method} "
                              f"{request.url.path}", "invalid_request_error", code,
                              headers=getattr(exc, "headers", None))

    def openapi() -> dict[str, Any]:
        # The bodies are read by the handlers themselves (for OpenAI-shaped errors), so
        # their schemas, made from the view structs, are added to the document here.
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version,
                                   description=app.description, routes=app.routes)
            document.setdefault("components", {}).setdefault("schemas", {}).update(
                components)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
