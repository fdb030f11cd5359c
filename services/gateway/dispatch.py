"""Dispatch: from a decision to the answer served.

The decided route's upstream is called first; when it still fails after its retries and
the route names a ``fallback_route``, that route answers instead. A non-streamed answer
of a route with ``escalate_to`` is checked by its gates, and one that fails them is asked
again of the escalation route, whose answer is checked by the same gates. Every upstream
call is an ``Attempt``; the observation is built from them. Nothing here knows HTTP.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from routemesh.contracts import CompletionObserved, RouteDecided
from routemesh.services.gateway.completion_stats import CompletionStats
from routemesh.services.gateway.gates import failed_gates
from routemesh.services.gateway.settings import GatewaySettings
from routemesh.services.gateway.upstream import (
    Upstream,
    UpstreamResponse,
    UpstreamStreamError,
    UpstreamUnavailable,
    upstream_failed,
)
from routemesh.services.router import Route, Router

# Why a later attempt was made instead of serving the first.
UPSTREAM_FAILURE = "upstream_failure"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One call to an upstream for a request."""

    model: str
    upstream: str
    status: int | None
    # upstream_<status>, or the client's failure class (connect_error, read_timeout, ...).
    error_class: str | None
    duration_ms: float
    # Its answer was not the one served.
    discarded: bool = False


@dataclass
class Dispatched:
    """What the upstreams answered: the served answer (a body, or a stream still to relay)
    or the failure, and every attempt that led there."""

    attempts: list[Attempt]
    status: int | None = None
    body: bytes | None = None
    stream: UpstreamResponse | None = None
    failure: UpstreamUnavailable | None = None
    reason: str | None = None
    gates: tuple[str, ...] = ()
    recovered: bool | None = None

    @property
    def served(self) -> Attempt:
        kept = [a for a in self.attempts if not a.discarded]
        return kept[-1] if kept else self.attempts[-1]

    def observation(
        self,
        decision: RouteDecided,
        *,
        stream: bool,
        tools_requested: bool,
        started: float,
        stats: CompletionStats | None = None,
        ttft_s: float | None = None,
        error_class: str | None = None,
    ) -> CompletionObserved:
        served = self.served
        stats = stats or CompletionStats()
        return CompletionObserved(
            request_id=decision.request_id,
            route_id=decision.route_id,
            target_model=served.model,
            upstream_status=served.status,
            duration_ms=(time.perf_counter() - started) * 1000,
            ttft_ms=ttft_s * 1000 if ttft_s is not None else None,
            prompt_tokens=stats.tokens("prompt_tokens"),
            completion_tokens=stats.tokens("completion_tokens"),
            total_tokens=stats.tokens("total_tokens"),
            finish_reason=stats.finish_reason,
            tools_requested=tools_requested,
            tools_used=stats.tools_used,
            stream=stream,
            error_class=error_class or served.error_class,
            escalation_path=tuple(a.model for a in self.attempts),
            escalation_reason=self.reason,
            escalation_gates=self.gates,
            escalation_recovered=self.recovered,
        )


class Dispatcher:
    def __init__(
        self,
        settings: GatewaySettings,
        upstream: Upstream,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.tracer = trace.get_tracer("routemesh.gateway", tracer_provider=tracer_provider)

    def address(self, route: Route | None) -> tuple[str, str | None]:
        """The base URL and API key of a route's upstream (the gateway's by default)."""
        if route is not None and route.upstream_base_url:
            # The config names the variable; the key itself lives only in the environment.
            key_env = route.upstream_api_key_env
            return route.upstream_base_url, os.environ.get(key_env) if key_env else None
        key = self.settings.upstream_api_key
        return self.settings.upstream_base_url, key.get_secret_value() if key else None

    def secrets(self, router: Router) -> list[str]:
        """Every upstream key a request through ``router`` may be sent with: what a
        relayed answer must never show the client."""
        keys = [self.address(route)[1] for route in (None, *router.config.routes)]
        return [key for key in keys if key]

    async def _call(
        self, route: Route | None, model: str, data: dict[str, Any]
    ) -> tuple[Attempt, UpstreamResponse | UpstreamUnavailable]:
        base_url, api_key = self.address(route)
        started = time.perf_counter()
        with self.tracer.start_as_current_span("routemesh.upstream") as span:
            span.set_attribute("routemesh.target_model", model)
            try:
                outcome: UpstreamResponse | UpstreamUnavailable = await self.upstream.open(
                    base_url, api_key, json.dumps(dict(data, model=model)).encode()
                )
            except UpstreamUnavailable as exc:
                outcome = exc
        status = outcome.status_code if isinstance(outcome, UpstreamResponse) else None
        error = str(outcome) if isinstance(outcome, UpstreamUnavailable) else (
            f"upstream_{status}" if status is not None and status >= 400 else None
        )
        duration = (time.perf_counter() - started) * 1000
        return Attempt(model, base_url, status, error, duration), outcome

    async def _first(
        self, router: Router, decision: RouteDecided, data: dict[str, Any]
    ) -> tuple[Dispatched, Route | None, UpstreamResponse | UpstreamUnavailable]:
        """The decided route's answer, or its fallback route's when it failed."""
        route = router.route(decision.route_id)
        attempt, outcome = await self._call(route, decision.target_model, data)
        result = Dispatched([attempt])
        failed = isinstance(outcome, UpstreamUnavailable) or upstream_failed(outcome.status_code)
        if failed and route is not None and route.fallback_route:
            if isinstance(outcome, UpstreamResponse):
                outcome.close()
            result.attempts[-1] = dataclasses.replace(attempt, discarded=True)
            route = router.route(route.fallback_route)
            assert route is not None
            attempt, outcome = await self._call(route, route.target_model, data)
            result.attempts.append(attempt)
            result.reason = UPSTREAM_FAILURE
        return result, route, outcome

    async def open_stream(
        self, router: Router, decision: RouteDecided, data: dict[str, Any]
    ) -> Dispatched:
        """For a streamed request: the served response with its body unread (an error
        answer is read whole). Never escalated: its bytes reach the client as they come."""
        result, _, outcome = await self._first(router, decision, data)
        if isinstance(outcome, UpstreamUnavailable):
            result.failure = outcome
            return result
        result.status = outcome.status_code
        if outcome.status_code < 400:
            result.stream = outcome
            return result
        await _read_into(result, outcome)
        return result

    async def complete(
        self, router: Router, decision: RouteDecided, data: dict[str, Any]
    ) -> Dispatched:
        """For a non-streamed request: the served body, escalated when gates fail."""
        result, route, outcome = await self._first(router, decision, data)
        if isinstance(outcome, UpstreamUnavailable):
            result.failure = outcome
            return result
        if not await _read_into(result, outcome):
            return result
        escalate_to = route.escalate_to if route is not None else None
        if result.reason is not None or escalate_to is None or result.status >= 400:
            return result
        gates = route.gates
        failed = failed_gates(data, _json(result.body), gates)
        if not failed:
            return result
        stronger = router.route(escalate_to)
        assert stronger is not None
        result.reason, result.gates, result.recovered = failed[0], tuple(failed), False
        attempt, second = await self._call(stronger, stronger.target_model, data)
        body = None
        if isinstance(second, UpstreamResponse):
            try:
                body = await second.read()
            except UpstreamStreamError as exc:
                attempt = dataclasses.replace(attempt, error_class=str(exc))
        usable = body is not None and attempt.status is not None and attempt.status < 400
        still_failed = failed_gates(data, _json(body), gates) if usable else failed
        # The stronger answer is served unless it fails more gates than the cheap one:
        # the route asked for escalation, and a tie goes to the stronger model.
        serve_stronger = usable and len(still_failed) <= len(failed)
        if serve_stronger:
            result.attempts[-1] = dataclasses.replace(result.attempts[-1], discarded=True)
            result.body, result.status = body, attempt.status
            result.recovered = not still_failed
        result.attempts.append(attempt if serve_stronger else dataclasses.replace(
            attempt, discarded=True))
        return result


async def _read_into(result: Dispatched, response: UpstreamResponse) -> bool:
    """Read a whole answer into ``result``; False (with the failure noted) if it broke off."""
    try:
        result.body = await response.read()
    except UpstreamStreamError as exc:
        result.failure = exc
        result.attempts[-1] = dataclasses.replace(result.attempts[-1], error_class=str(exc))
        return False
    result.status = response.status_code
    return True


def _json(body: bytes | None) -> Any:
    try:
        return json.loads(body) if body is not None else None
    except ValueError:
        return None
