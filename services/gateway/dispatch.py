"""Dispatch: from a decision to the answer served.

A ``Plan`` resolves, once, the route objects a decision may be served by: the decided
route, its failover route (served when the route's upstream still fails after its
retries) and its escalation route (asked again when a non-streamed answer fails the
route's gates). Every upstream call is an ``UpstreamCall``; a whole answer is parsed once
(``Answer``) for the gates and the observation alike. Nothing here knows HTTP.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from routemesh.contracts import CompletionObserved, RouteDecided, UpstreamCall
from routemesh.contracts.events import FailoverReason
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
from routemesh.services.router import Route, Router, RouteRequest


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole upstream body, parsed once."""

    body: bytes
    parsed: Any
    stats: CompletionStats

    @classmethod
    def of(cls, body: bytes) -> Answer:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        return cls(body, parsed, CompletionStats.of_parsed(parsed))


@dataclass(frozen=True, slots=True)
class Call:
    """One call to an upstream for a request, and the answer when one came whole."""

    route: Route | None
    model: str
    upstream: str
    status: int | None
    # upstream_<status>, or the client's failure class (connect_error, read_timeout, ...).
    error_class: str | None
    duration_ms: float
    served: bool = True
    answer: Answer | None = None
    failed_gates: tuple[str, ...] = ()

    def event(self) -> UpstreamCall:
        stats = self.answer.stats if self.answer is not None else None
        return UpstreamCall(
            model=self.model, route_id=self.route.id if self.route else None,
            upstream_status=self.status, error_class=self.error_class,
            duration_ms=self.duration_ms, served=self.served,
            completion_tokens=stats.tokens("completion_tokens") if stats else None,
            finish_reason=stats.finish_reason if stats else None,
            tools_used=stats.tools_used if stats else False, failed_gates=self.failed_gates)


@dataclass(frozen=True, slots=True)
class Plan:
    """Where one decision may be served, resolved once from the router that made it."""

    decision: RouteDecided
    # None for a passthrough: the gateway's own upstream, the requested model.
    route: Route | None
    failover: Route | None
    escalation: Route | None

    @classmethod
    def of(cls, router: Router, decision: RouteDecided) -> Plan:
        route = router.route(decision.route_id)
        return cls(
            decision, route,
            router.route(route.failover_route) if route and route.failover_route else None,
            router.route(route.escalate_to) if route and route.escalate_to else None,
        )

    @property
    def routes(self) -> tuple[Route | None, ...]:
        return (self.route, self.failover, self.escalation)


@dataclass
class Dispatched:
    """What the upstreams answered: the served answer (whole, or a stream still to relay)
    or the failure, and every call that led there."""

    calls: list[Call]
    answer: Answer | None = None
    stream: UpstreamResponse | None = None
    failure: UpstreamUnavailable | None = None
    failover_reason: FailoverReason | None = None
    gates: tuple[str, ...] = ()
    recovered: bool | None = None

    @property
    def served(self) -> Call:
        kept = [c for c in self.calls if c.served]
        return kept[-1] if kept else self.calls[-1]

    @property
    def status(self) -> int | None:
        return self.served.status

    def observation(
        self,
        decision: RouteDecided,
        request: RouteRequest,
        *,
        stream: bool,
        started: float,
        stats: CompletionStats | None = None,
        ttft_s: float | None = None,
        error_class: str | None = None,
    ) -> CompletionObserved:
        served = self.served
        stats = stats or (self.answer.stats if self.answer else CompletionStats())
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
            tools_requested=request.tools_present,
            tools_used=stats.tools_used,
            stream=stream,
            error_class=error_class or served.error_class,
            escalation_path=tuple(c.model for c in self.calls),
            escalation_reason=self.gates[0] if self.gates else None,
            escalation_gates=self.gates,
            escalation_recovered=self.recovered,
            calls=tuple(c.event() for c in self.calls),
            failover_reason=self.failover_reason,
        )


@dataclass
class _Outcome:
    call: Call
    response: UpstreamResponse | UpstreamUnavailable = field(repr=False)


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

    def secrets(self, plan: Plan) -> list[str]:
        """Every upstream key the plan's calls may be sent with: what a relayed answer
        must never show the client."""
        keys = [self.address(route)[1] for route in (None, *plan.routes)]
        return [key for key in keys if key]

    async def _call(self, route: Route | None, model: str, data: dict[str, Any]) -> _Outcome:
        base_url, api_key = self.address(route)
        started = time.perf_counter()
        with self.tracer.start_as_current_span("routemesh.upstream") as span:
            span.set_attribute("routemesh.target_model", model)
            try:
                response: UpstreamResponse | UpstreamUnavailable = await self.upstream.open(
                    base_url, api_key, json.dumps(dict(data, model=model)).encode()
                )
            except UpstreamUnavailable as exc:
                response = exc
        status = response.status_code if isinstance(response, UpstreamResponse) else None
        error = str(response) if isinstance(response, UpstreamUnavailable) else (
            f"upstream_{status}" if status is not None and status >= 400 else None
        )
        duration = (time.perf_counter() - started) * 1000
        return _Outcome(Call(route, model, base_url, status, error, duration), response)

    async def _first(self, plan: Plan, data: dict[str, Any]) -> tuple[Dispatched, _Outcome]:
        """The decided route's answer, or its failover route's when it failed."""
        outcome = await self._call(plan.route, plan.decision.target_model, data)
        result = Dispatched([outcome.call])
        response = outcome.response
        failed = isinstance(response, UpstreamUnavailable) or upstream_failed(
            response.status_code)
        if failed and plan.failover is not None:
            if isinstance(response, UpstreamResponse):
                response.close()
            result.calls[-1] = dataclasses.replace(outcome.call, served=False)
            outcome = await self._call(plan.failover, plan.failover.target_model, data)
            result.calls.append(outcome.call)
            result.failover_reason = "upstream_failure"
        return result, outcome

    async def open_stream(self, plan: Plan, data: dict[str, Any]) -> Dispatched:
        """For a streamed request: the served response with its body unread (an error
        answer is read whole). Never escalated: its bytes reach the client as they come."""
        result, outcome = await self._first(plan, data)
        response = outcome.response
        if isinstance(response, UpstreamUnavailable):
            result.failure = response
        elif response.status_code < 400:
            result.stream = response
        else:
            await _read_into(result, response)
        return result

    async def complete(self, plan: Plan, request: RouteRequest,
                       data: dict[str, Any]) -> Dispatched:
        """For a non-streamed request: the served answer, escalated when gates fail."""
        result, outcome = await self._first(plan, data)
        response = outcome.response
        if isinstance(response, UpstreamUnavailable):
            result.failure = response
            return result
        if not await _read_into(result, response):
            return result
        stronger = plan.escalation
        if result.failover_reason is not None or stronger is None or plan.route is None \
                or (result.status or 0) >= 400 or result.answer is None:
            return result
        gates = plan.route.gates
        failed = tuple(failed_gates(request, result.answer.parsed, gates))
        if not failed:
            return result
        result.calls[-1] = dataclasses.replace(result.calls[-1], failed_gates=failed)
        result.gates, result.recovered = failed, False
        second = await self._call(stronger, stronger.target_model, data)
        call, answer = second.call, None
        if isinstance(second.response, UpstreamResponse):
            try:
                answer = Answer.of(await second.response.read())
            except UpstreamStreamError as exc:
                call = dataclasses.replace(call, error_class=str(exc))
        usable = answer is not None and call.status is not None and call.status < 400
        still_failed = tuple(failed_gates(request, answer.parsed, gates)) \
            if usable and answer is not None else failed
        call = dataclasses.replace(call, answer=answer,
                                   failed_gates=still_failed if usable else ())
        # The stronger answer is served unless it fails more gates than the cheap one:
        # the route asked for escalation, and a tie goes to the stronger model.
        if usable and len(still_failed) <= len(failed):
            result.calls[-1] = dataclasses.replace(result.calls[-1], served=False)
            result.calls.append(call)
            result.answer, result.recovered = answer, not still_failed
        else:
            result.calls.append(dataclasses.replace(call, served=False))
        return result


async def _read_into(result: Dispatched, response: UpstreamResponse) -> bool:
    """Read a whole answer into ``result``; False (with the failure noted) if it broke off."""
    try:
        answer = Answer.of(await response.read())
    except UpstreamStreamError as exc:
        result.failure = exc
        result.calls[-1] = dataclasses.replace(result.calls[-1], error_class=str(exc))
        return False
    result.answer = answer
    result.calls[-1] = dataclasses.replace(result.calls[-1], answer=answer)
    return True
