"""Shadow decisions: each request decided again with a candidate config after the live
decision, off the request path, and published as a ``RouteDecided`` with ``shadow`` set.

A bounded queue and one background task: when the queue is full the request is dropped
from the shadow (counted), never delayed. When the shadow config keeps the live encoder
the embedding cache (kept on while a shadow runs) gives the shadow the vector the live
decision just made, so the shadow costs a match, not an encode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
from prometheus_client import Counter

from routemesh.services.gateway.app import Publisher
from routemesh.services.router import Router, RouteRequest

log = logging.getLogger(__name__)


class Shadow:
    def __init__(self, router: Router, publisher: Publisher, decisions: Counter,
                 queue_size: int) -> None:
        """``decisions``: routemesh_gateway_shadow_decisions_total, by outcome."""
        self.router = router
        self.publisher = publisher
        self._queue: asyncio.Queue[tuple[RouteRequest, str]] = asyncio.Queue(queue_size)
        self._task: asyncio.Task[None] | None = None
        self._decisions = decisions
        for outcome in ("published", "dropped", "failed"):
            self._decisions.labels(outcome)

    def offer(self, request: RouteRequest, request_id: str) -> None:
        try:
            self._queue.put_nowait((request, request_id))
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
            request, request_id = await self._queue.get()
            try:
                decision = await self.router.adecide(request, request_id)
            except Exception as exc:
                # An override naming a route the shadow config lacks, for one.
                self._decisions.labels("failed").inc()
                log.debug("shadow decision failed", extra={"error": type(exc).__name__})
            else:
                self.publisher.offer(msgspec.structs.replace(decision, shadow=True))
                self._decisions.labels("published").inc()
            finally:
                self._queue.task_done()
