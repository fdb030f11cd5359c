"""Shadow decisions: each request decided again with a candidate config after the live
decision, off the request path, and published as a ``ShadowDecided`` on its own topic
(``route.decisions.v1`` keeps one decision per request).

A bounded queue and one background task: when the queue is full the request is dropped
from the shadow (counted), never delayed. When the shadow config keeps the live encoder
the embedding cache (kept on while a shadow runs) gives the shadow the vector the live
decision just made, so the shadow costs a match, not an encode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import Counter

from routemesh.contracts import RouteDecided, ShadowDecided
from routemesh.contracts.events import ShadowDifference
from routemesh.services.gateway.app import Publisher
from routemesh.services.router import Router, RouteRequest

log = logging.getLogger(__name__)


class Shadow:
    def __init__(self, router: Router, publisher: Publisher, decisions: Counter,
                 queue_size: int) -> None:
        """``decisions``: routemesh_gateway_shadow_decisions_total, by outcome."""
        self.router = router
        self.publisher = publisher
        self._queue: asyncio.Queue[tuple[RouteRequest, RouteDecided]] = asyncio.Queue(
            queue_size)
        self._task: asyncio.Task[None] | None = None
        self._decisions = decisions
        for outcome in ("published", "dropped", "failed"):
            self._decisions.labels(outcome)

    def offer(self, request: RouteRequest, live: RouteDecided) -> None:
        try:
            self._queue.put_nowait((request, live))
        except asyncio.QueueFull:
            self._decisions.labels("dropped").inc()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="routemesh-shadow")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.router.aclose()

    async def join(self) -> None:
        """Until every offered request is decided (tests and benches)."""
        await self._queue.join()

    async def _run(self) -> None:
        while True:
            request, live = await self._queue.get()
            try:
                decision = await self.router.adecide(request, live.request_id)
            except Exception as exc:
                # An override naming a route the shadow config lacks, for one.
                self._decisions.labels("failed").inc()
                log.debug("shadow decision failed", extra={"error": type(exc).__name__})
            else:
                self.publisher.offer(shadow_decided(live, decision))
                self._decisions.labels("published").inc()
            finally:
                self._queue.task_done()


_COMPARED: tuple[ShadowDifference, ...] = ("route_id", "reason", "target_model", "match_source")


def shadow_decided(live: RouteDecided, shadow: RouteDecided) -> ShadowDecided:
    """The shadow config's decision beside the live one it shadows."""
    return ShadowDecided(
        request_id=live.request_id, live_event_id=live.event_id,
        route_id=shadow.route_id, target_model=shadow.target_model, reason=shadow.reason,
        layer=shadow.layer, score=shadow.score, second_route_id=shadow.second_route_id,
        second_score=shadow.second_score, margin=shadow.margin, threshold=shadow.threshold,
        match_source=shadow.match_source, match_index=shadow.match_index,
        match_text_sha256=shadow.match_text_sha256,
        decision_latency_ms=shadow.decision_latency_ms, config_source=shadow.config_source,
        config_sha256=shadow.config_sha256, route_bank_sha256=shadow.route_bank_sha256,
        live_route_id=live.route_id, live_reason=live.reason,
        live_target_model=live.target_model, live_config_sha256=live.config_sha256,
        differs=tuple(name for name in _COMPARED
                      if getattr(live, name) != getattr(shadow, name)),
        gateway_instance=shadow.gateway_instance,
    )
