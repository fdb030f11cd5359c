"""`routemesh serve gateway`: the HTTP front door as a mesh service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterator

import uvicorn
from faststream.kafka import KafkaMessage

from routemesh.contracts import Event, RouteBankPublished
from routemesh.contracts.topics import ROUTEBANK_CHANGES
from routemesh.services.gateway.app import GatewayState, create_app
from routemesh.services.gateway.auth import ApiKeys
from routemesh.services.gateway.dispatch import Dispatcher
from routemesh.services.gateway.protocol import GatewayHttp
from routemesh.services.gateway.publisher import DeadLettering, EventPublisher, Quarantine
from routemesh.services.gateway.reload import Reloader
from routemesh.services.gateway.settings import GatewaySettings
from routemesh.services.gateway.shadow import Shadow
from routemesh.services.gateway.spool import Spool
from routemesh.services.gateway.upstream import Upstream
from routemesh.services.router import Router, load_config, load_router, open_qdrant
from routemesh.services.runtime.kafka import subscribe_events
from routemesh.services.runtime.service import (
    ServiceContext,
    ServicePort,
    ServiceSpec,
    metrics_port,
)

log = logging.getLogger(__name__)
SPOOL_CHECK_S = 1.0


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside a mesh service: the runtime owns SIGTERM/SIGINT and stops the
    server through ``should_exit``, so uvicorn must not take the signals over."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def listening(self, serving: asyncio.Task[None]) -> None:
        """Return once the server accepts connections: the gateway reports ready only
        then, or a readiness probe would send traffic to a port that refuses it. Raises
        what stopped the server if it ended first (a port in use)."""
        while not self.started:
            if serving.done():
                serving.result()
                raise RuntimeError("the HTTP server stopped before it listened")
            await asyncio.sleep(0.01)


def build_router(settings: GatewaySettings, current: Router | None = None, *,
                 shadow: bool = False) -> Router:
    """The router the settings name (the shadow config's when ``shadow``): its config,
    its bank in Qdrant (built first in the embedded default), and the current router's
    encoder when the new config keeps it."""
    key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
    path, name = settings.router_config, settings.router_config_name
    if shadow:
        assert settings.shadow_config is not None
        path, name = settings.shadow_config, settings.shadow_config_name
    cache = settings.embedding_cache_size
    if settings.shadow_config is not None:
        # The shadow finds the live decision's vector here instead of encoding again.
        cache = max(cache, settings.shadow_queue_size)
    try:
        return load_router(
            load_config(path, name),
            qdrant=open_qdrant(*settings.qdrant_location(), key),
            instance=settings.instance_id or "gateway",
            autobuild=settings.bank_autobuild,
            current=current,
            embedding_cache=cache,
        )
    except LookupError as exc:
        raise LookupError(f"{exc} (Qdrant looked at: {settings.qdrant_described()}; "
                          "`routemesh bank build` writes there with the same settings)"
                          ) from None


class Gateway:
    def __init__(self, ctx: ServiceContext) -> None:
        settings = ctx.settings
        assert isinstance(settings, GatewaySettings)
        self.ctx = ctx
        self.settings = settings
        self.publisher = EventPublisher(
            ctx.producer, settings, ctx.registry, settings.publish_queue_size,
            spool=Spool(settings.spool_dir), set_aside=DeadLettering(ctx.dead_letters, settings),
            spool_max_bytes=settings.spool_max_bytes,
        )
        # Review captures hold (redacted) prompt text: a queue and a spool of their own
        # under the review directory; a line that cannot be read back stays there, never
        # reaching the DLQ.
        review_spool = settings.review_dir / "spool"
        self.review = EventPublisher(
            ctx.producer, settings, ctx.registry, settings.publish_queue_size,
            spool=Spool(review_spool), queue="review",
            set_aside=Quarantine(review_spool / "unreadable.jsonl"),
            spool_max_bytes=settings.spool_max_bytes,
        ) if settings.review_capture == "redacted_topic" else None
        self.upstream = Upstream(settings.upstream_connect_timeout_s,
                                 settings.upstream_read_timeout_s, settings.upstream_max_retries)
        self.state: GatewayState | None = None
        self.shadow: Shadow | None = None
        self.reloader: Reloader | None = None
        self._server: _EmbeddedServer | None = None
        self._serving: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        # The newest bank announced while the router was still loading, for after it is.
        self._announced_early: RouteBankPublished | None = None
        # Every gateway must see every bank change: a broadcast, no consumer group (a
        # group per instance would leave one behind at every restart).
        subscribe_events(ctx.broker, settings, [ROUTEBANK_CHANGES], group_id=None,
                         handler=self._on_bank, dead_letters=ctx.dead_letters)

    @property
    def _publishers(self) -> list[EventPublisher]:
        return [p for p in (self.publisher, self.review) if p is not None]

    async def _on_bank(self, event: Event, msg: KafkaMessage) -> None:
        if not isinstance(event, RouteBankPublished):
            return
        if self.reloader is None:
            self._announced_early = event
            return
        await self.reloader.on_bank_published(event)

    async def start(self) -> None:
        settings, ctx = self.settings, self.ctx
        keys = (
            ApiKeys(settings.auth_key_sha256, settings.auth_keys_file)
            if settings.auth_enabled
            else None
        )
        built_at = time.time()
        router = await asyncio.to_thread(build_router, settings)
        self.state = state = GatewayState(
            settings, router, Dispatcher(settings, self.upstream, ctx.tracer_provider),
            self.publisher, ctx.registry, keys, ctx.tracer_provider, self.review,
        )
        if settings.shadow_config is not None:
            shadow_router = await asyncio.to_thread(build_router, settings, router,
                                                    shadow=True)
            self.shadow = Shadow(shadow_router, self.publisher, state.metrics.shadow,
                                 settings.shadow_queue_size)
            await self.shadow.start()
            state.shadow = self.shadow
        for publisher in self._publishers:
            await publisher.start()
        config = uvicorn.Config(create_app(state), host=settings.http_host,
                                port=settings.http_port, log_config=None, lifespan="off",
                                access_log=False, http=GatewayHttp,
                                # Without a bound, uvicorn waits forever for idle
                                # keep-alive connections.
                                timeout_graceful_shutdown=math.ceil(
                                    settings.shutdown_timeout_s * 0.4))
        self._server = _EmbeddedServer(config)
        self._serving = asyncio.create_task(self._server.serve())
        await self._server.listening(self._serving)
        self.reloader = Reloader(state, lambda: build_router(settings, state.router),
                                 ctx.registry, built_at=built_at)
        if self._announced_early is not None:
            await self.reloader.on_bank_published(self._announced_early)
        await self.reloader.start()
        ctx.readiness.set("router", True, router.loaded.source)
        self._watching = asyncio.create_task(self._watch_spool())

    async def _watch_spool(self) -> None:
        """Ready while every publisher can keep what it is offered; how much waits on
        disk is a note beside the Kafka one."""
        readiness = self.ctx.readiness
        while True:
            full = [p.queue_name for p in self._publishers if not p.has_room]
            readiness.set("spool", not full, f"full: {', '.join(full)}" if full else "room")
            waiting = sum(p.spool.pending_bytes for p in self._publishers if p.spool)
            readiness.note("spooled_bytes", waiting == 0, str(waiting))
            await asyncio.sleep(SPOOL_CHECK_S)

    async def stop(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
        if self.reloader is not None:
            await self.reloader.stop()
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            await self._serving
        if self.shadow is not None:
            await self.shadow.stop()
        # What the broker has not confirmed by then goes to the spool for the next start.
        for publisher in self._publishers:
            await publisher.drain(timeout_s=self.settings.shutdown_timeout_s * 0.3)
        await self.upstream.aclose()


SPEC = ServiceSpec(
    name="gateway",
    settings_class=GatewaySettings,
    factory=Gateway,
    ports=(metrics_port(9101),
           ServicePort("http", 8080, "ROUTEMESH_HTTP_PORT", "ROUTEMESH_HTTP_HOST")),
    # Through a Kafka outage the gateway serves and spools: ready while the spool has room.
    front_door=True,
    description="OpenAI-compatible proxy and decision API",
    dev_env=lambda data_dir, instance: {
        "ROUTEMESH_BANK_AUTOBUILD": "true",
        # Each replica spools on its own, as on its own volume.
        "ROUTEMESH_SPOOL_DIR": str(data_dir / "spool" / instance),
        "ROUTEMESH_REVIEW_DIR": str(data_dir / "review"),
        "ROUTEMESH_AUTH_ENABLED": "false",
    },
)
