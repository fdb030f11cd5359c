"""How a service is declared, discovered and run.

A service package exposes a ``ServiceSpec`` and registers it under the
``routemesh.services`` entry-point group in pyproject.toml. ``routemesh serve NAME`` and
``routemesh dev`` find it there, so adding a service edits no list in the code.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from faststream.kafka import KafkaBroker
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from routemesh.contracts import Topic
from routemesh.services.runtime.consumer import BatchHandler, EventConsumer
from routemesh.services.runtime.kafka import (
    DeadLetters,
    EventProducer,
    create_broker,
    until_reachable,
    without_refused_idempotence,
)
from routemesh.services.runtime.settings import ServiceSettings, unknown_variables
from routemesh.services.runtime.telemetry import (
    MetricsServer,
    Readiness,
    setup_logging,
    setup_tracing,
)

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "routemesh.services"
READINESS_INTERVAL_S = 2.0
HEARTBEAT_S = 1.0


class Service(Protocol):
    """What a service is to the runtime: started once Kafka is connected, stopped on
    SIGTERM/SIGINT before the producer flushes (so it can still publish while it drains)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class ServiceContext:
    """Everything a service is made with."""

    name: str
    settings: ServiceSettings
    # FastStream, for subscribe_events and the readiness ping.
    broker: KafkaBroker
    producer: EventProducer
    registry: CollectorRegistry
    readiness: Readiness
    tracer_provider: TracerProvider
    dead_letters: DeadLetters

    def consumer(
        self, topics: list[Topic], group_id: str, handler: BatchHandler, **options: Any
    ) -> EventConsumer:
        """An EventConsumer wired to this service's dead letters, metrics and traces."""
        return EventConsumer(
            self.settings, topics, group_id=group_id, handler=handler,
            dead_letters=self.dead_letters, registry=self.registry, service=self.name,
            tracer_provider=self.tracer_provider, readiness=self.readiness, **options,
        )


@dataclass(frozen=True)
class ServicePort:
    """A port a service listens on, and the settings variables that place it."""

    name: str
    default: int
    env: str
    host_env: str


def metrics_port(default: int) -> ServicePort:
    """/metrics, /healthz and /readyz: every service has one."""
    return ServicePort("metrics", default, "ROUTEMESH_METRICS_PORT", "ROUTEMESH_METRICS_HOST")


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    settings_class: type[ServiceSettings]
    factory: Callable[[ServiceContext], Service]
    # Every port it listens on, the metrics port first.
    ports: tuple[ServicePort, ...]
    description: str = ""
    # Extra environment `routemesh dev` gives an instance of the service (``gateway``,
    # ``gateway-2``...), from the dev data directory: what the instances share (an audit
    # trail) or what each keeps for itself (a spool).
    dev_env: Callable[[Path, str], dict[str, str]] = lambda data_dir, instance: {}
    # Takes requests from outside the mesh (the gateway): it serves and spools through a
    # Kafka outage, so Kafka is a status note there, not a readiness check; and a stop of
    # the whole mesh ends it first, so what it publishes reaches the consumers.
    front_door: bool = False
    # What every instance's environment sets when the service runs as more than one
    # (the scorer and the drift detector keep their state on changelogs then):
    # `routemesh dev --replicas` sets it, and the chart refuses replicas without it.
    scale_out_env: dict[str, str] = field(default_factory=dict)

    def port(self, name: str) -> ServicePort:
        for port in self.ports:
            if port.name == name:
                return port
        raise KeyError(f"{self.name} declares no {name} port")


async def _started(ctx: ServiceContext, service: Service, stop: asyncio.Event) -> bool:
    """Start the clients and the service, unless a stop comes first (False): a start can
    wait without end (a consumer group that never settles), and SIGTERM must still end
    the process."""
    async def start() -> None:
        await ctx.broker.start()
        await ctx.producer.start()
        await service.start()

    starting = asyncio.create_task(start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if starting.done():
        starting.result()
        return True
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    return False


def discover_services() -> dict[str, ServiceSpec]:
    specs: dict[str, ServiceSpec] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        spec = ep.load()
        if not isinstance(spec, ServiceSpec):
            raise TypeError(f"entry point {ep.name} = {ep.value} is not a ServiceSpec")
        specs[spec.name] = spec
    return dict(sorted(specs.items()))


def build_context(spec: ServiceSpec, settings: ServiceSettings) -> ServiceContext:
    registry = CollectorRegistry()
    tracer_provider = setup_tracing(spec.name, settings)
    broker = create_broker(settings, service=spec.name, tracer_provider=tracer_provider)
    producer = EventProducer(settings, spec.name, tracer_provider)
    return ServiceContext(
        name=spec.name,
        settings=settings,
        broker=broker,
        producer=producer,
        registry=registry,
        readiness=Readiness(settings.liveness_stall_s),
        tracer_provider=tracer_provider,
        dead_letters=DeadLetters(producer.publish, spec.name, registry,
                                 spill_dir=settings.dead_letter_dir,
                                 max_bytes=settings.dead_letter_max_bytes),
    )


async def _watch_broker(ctx: ServiceContext, gating: bool) -> None:
    report = ctx.readiness.set if gating else ctx.readiness.note
    while True:
        ok = await ctx.broker.ping(timeout=READINESS_INTERVAL_S)
        report("kafka", ok, "" if ok else "broker did not answer")
        await asyncio.sleep(READINESS_INTERVAL_S)


async def _heartbeat(ctx: ServiceContext) -> None:
    """The event loop's liveness: /healthz fails when this stops running."""
    while True:
        ctx.readiness.beat()
        await asyncio.sleep(HEARTBEAT_S)


async def run(spec: ServiceSpec, settings: ServiceSettings | None = None) -> None:
    """Run one service until SIGTERM or SIGINT, then stop consuming, drain and flush."""
    if settings is None:
        # The spec's own class counts too: a service outside discover_services() (one
        # built on this runtime by a user, or a test's sample) names its own settings.
        known = {spec.settings_class,
                 *(s.settings_class for s in discover_services().values())}
        unknown = unknown_variables(os.environ, list(known))
        if unknown:
            raise SystemExit(f"routemesh {spec.name}: unknown settings: {', '.join(unknown)}")
        settings = spec.settings_class()
    setup_logging(spec.name, settings.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not await until_reachable(settings, stop):
        log.info("stopped while waiting for Kafka")
        return
    settings = await without_refused_idempotence(settings)
    ctx = build_context(spec, settings)
    gating = not spec.front_door
    (ctx.readiness.set if gating else ctx.readiness.note)("kafka", False, "not connected yet")
    service = spec.factory(ctx)

    metrics = MetricsServer(
        settings.metrics_host, settings.metrics_port, ctx.registry, ctx.readiness
    )
    metrics.start()
    log.info("service starting", extra={"metrics_port": metrics.port})
    watcher = None
    heartbeat = asyncio.create_task(_heartbeat(ctx))
    try:
        if await _started(ctx, service, stop):
            # What start-up loaded (models, banks, libraries) lives as long as the
            # process; frozen, it is out of the cyclic collector's reach, which otherwise
            # walks it on every full collection (a large share of the gateway's event
            # loop under load in bench/gateway.py).
            gc.collect()
            gc.freeze()
            watcher = asyncio.create_task(_watch_broker(ctx, gating))
            log.info("service running")
            await stop.wait()
            log.info("service stopping")
        else:
            log.warning("stopped while starting")
    finally:
        for task in (watcher, heartbeat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        stop_by = loop.time() + settings.shutdown_timeout_s
        try:
            # A consumer whose group never settles can hang in its stop as in its start:
            # what it did not commit is delivered again, so the budget bounds it too.
            await asyncio.wait_for(service.stop(), settings.shutdown_timeout_s)
        except TimeoutError:
            log.warning("the service did not stop within the shutdown timeout; stopped "
                        "without it")
        # FastStream stops the subscribers, waits for handlers in flight (each commits its
        # own offset); then the producer flushes. Both talk to Kafka, which may be down:
        # they get what is left of the shutdown budget. What they could not confirm was
        # not committed (consumers) or is in the spool (the gateway), so it is not lost.
        for what, stopping in (("subscribers", ctx.broker.stop()),
                               ("producer", ctx.producer.stop())):
            try:
                await asyncio.wait_for(stopping, max(stop_by - loop.time(), 1.0))
            except TimeoutError:
                log.warning("Kafka did not answer within the shutdown timeout; stopped "
                            "without it", extra={"stopping": what})
        ctx.tracer_provider.shutdown()
        metrics.stop()
        log.info("service stopped")
