"""`routemesh serve gateway`: the HTTP front door as a mesh service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from routemesh.contracts import Event, RouteBankPublished
from routemesh.contracts.topics import ROUTEBANK_CHANGES
from routemesh.services.gateway.app import GatewayState, create_app
from routemesh.services.gateway.auth import ApiKeys
from routemesh.services.gateway.dispatch import Dispatcher
from routemesh.services.gateway.publisher import EventPublisher, quarantine
from routemesh.services.gateway.reload import Reloader
from routemesh.services.gateway.settings import GatewaySettings
from routemesh.services.gateway.spool import Spool
from routemesh.services.gateway.upstream import Upstream
from routemesh.services.router.bank import build_bank, default_collection
from routemesh.services.router.cascade import Router
from routemesh.services.router.config import load_config
from routemesh.services.router.encoders import build_dense_encoder
from routemesh.services.router.factory import StaleBankError, load_router, open_qdrant
from routemesh.services.runtime.kafka import EventProducer, subscribe_events
from routemesh.services.runtime.service import ServiceContext, ServiceSpec

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside a mesh service: the runtime owns SIGTERM/SIGINT and stops the
    server through ``should_exit``, so uvicorn must not take the signals over."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build_router(
    settings: GatewaySettings, instance: str, current: Router | None = None
) -> Router:
    """Load the config and its bank; in the embedded default, build the bank if needed.
    The ``current`` router's encoder is kept when the encoder config did not change: a
    reload that only edits routes need not load a model again."""
    loaded = load_config(settings.router_config, settings.router_config_name)
    key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
    qdrant = open_qdrant(settings.qdrant_url, settings.qdrant_path, key)
    if current is not None and current.encoder is not None and (
        current.config.encoder == loaded.config.encoder
    ):
        encoder = current.encoder
    else:
        encoder = build_dense_encoder(loaded.config.encoder)
    try:
        return load_router(loaded, qdrant=qdrant, encoder=encoder, instance=instance)
    except (LookupError, StaleBankError):
        if not settings.bank_autobuild:
            raise
    report = build_bank(loaded, encoder, qdrant, default_collection(loaded))
    log.info("route bank built", extra={"embedded": report.embedded, "kept": report.kept})
    return load_router(loaded, qdrant=qdrant, encoder=encoder, instance=instance)


async def setup(ctx: ServiceContext) -> None:
    settings = ctx.settings
    assert isinstance(settings, GatewaySettings)
    producer = EventProducer(settings, "gateway")
    publisher = EventPublisher(producer, settings, ctx.registry, settings.publish_queue_size,
                               spool=Spool(settings.spool_dir),
                               tracer_provider=ctx.tracer_provider)
    # Review captures hold (redacted) prompt text: a queue and a spool of their own under
    # the review directory, and a line that cannot be read back stays there, never the DLQ.
    review_spool = settings.review_dir / "spool"
    review = EventPublisher(
        producer, settings, ctx.registry, settings.publish_queue_size,
        spool=Spool(review_spool), tracer_provider=ctx.tracer_provider, queue="review",
        unreadable=quarantine(review_spool / "unreadable.jsonl"),
    ) if settings.review_capture == "redacted" else None
    publishers = [p for p in (publisher, review) if p is not None]
    upstream = Upstream(settings.upstream_connect_timeout_s, settings.upstream_read_timeout_s,
                        settings.upstream_max_retries)
    server: _EmbeddedServer | None = None
    serving: asyncio.Task[None] | None = None
    reloader: Reloader | None = None
    instance = settings.instance_id or "gateway"

    # The newest bank announced while the router was still loading, for after it is.
    announced_early: RouteBankPublished | None = None

    async def on_bank(event: Event, msg: object) -> None:
        nonlocal announced_early
        if not isinstance(event, RouteBankPublished):
            return
        if reloader is None:
            announced_early = event
            return
        await reloader.on_bank_published(event)

    # Every gateway must see every bank change: a broadcast, no consumer group (a group
    # per instance would leave one behind at every restart).
    subscribe_events(ctx.broker, settings, [ROUTEBANK_CHANGES], group_id=None,
                     handler=on_bank, dead_letters=ctx.dead_letters)

    async def start() -> None:
        nonlocal server, serving, reloader
        keys = (
            ApiKeys(settings.auth_key_sha256, settings.auth_keys_file)
            if settings.auth_enabled
            else None
        )
        built_at = time.time()
        router = await asyncio.to_thread(build_router, settings, instance)
        state = GatewayState(settings, router, Dispatcher(settings, upstream, ctx.tracer_provider),
                             publisher, ctx.registry, keys, ctx.tracer_provider, review)
        await producer.start()
        for each in publishers:
            await each.start()
        config = uvicorn.Config(create_app(state), host=settings.http_host,
                                port=settings.http_port, log_config=None, lifespan="off",
                                access_log=False,
                                # Without a bound, uvicorn waits forever for idle
                                # keep-alive connections; half the shutdown budget is theirs.
                                timeout_graceful_shutdown=settings.shutdown_timeout_s / 2)
        server = _EmbeddedServer(config)
        serving = asyncio.create_task(server.serve())
        reloader = Reloader(state, settings.router_config,
                            lambda: build_router(settings, instance, state.router),
                            ctx.registry, built_at=built_at)
        if announced_early is not None:
            await reloader.on_bank_published(announced_early)
        await reloader.start()
        ctx.readiness.set("router", True, router.loaded.source)

    async def stop() -> None:
        if reloader is not None:
            await reloader.stop()
        if server is not None and serving is not None:
            server.should_exit = True
            await serving
        for each in publishers:
            await each.drain(timeout_s=5.0)
        await producer.stop()
        await upstream.aclose()

    ctx.on_startup.append(start)
    ctx.on_shutdown.append(stop)


SPEC = ServiceSpec(
    name="gateway",
    settings_class=GatewaySettings,
    setup=setup,
    default_metrics_port=9101,
    description="OpenAI-compatible proxy and decision API",
    dev_env=lambda data_dir: {"ROUTEMESH_BANK_AUTOBUILD": "true",
                              "ROUTEMESH_SPOOL_DIR": str(Path(data_dir) / "spool" / "gateway"),
                              "ROUTEMESH_HTTP_HOST": "127.0.0.1",
                              "ROUTEMESH_AUTH_ENABLED": "false"},
    dev_http_port=8080,
)


