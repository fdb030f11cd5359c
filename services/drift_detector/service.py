"""The drift-detector service: consume decisions and observations, judge every target
model and route as they come, publish a DriftAlert when a verdict changes, and keep the
state on local disk so a restart neither loses nor repeats a transition.

Durability, in order, each time the state is saved (at most every
``drift_snapshot_interval_s``, and whenever a transition is waiting):
1. the detector's state, the offsets it reflects and the alerts not yet confirmed are
   written atomically to ``drift_state_dir``;
2. the waiting alerts are published (their ``event_id`` is the transition's identity);
3. the offsets are released to the consumer, which commits them.
A crash before 1 redelivers the events (nothing was published); after 1, the restart
reads the state back, skips the events it already holds, and publishes the waiting
alerts that are not on the alerts topic yet.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import Field, model_validator

from routemesh.contracts import CompletionObserved, DriftAlert, RouteDecided
from routemesh.contracts.topics import DRIFT_ALERTS, LLM_OBSERVATIONS, ROUTE_DECISIONS
from routemesh.services.drift_detector.detector import Detector, Pinned, Scope
from routemesh.services.drift_detector.presets import Preset, thresholds
from routemesh.services.drift_detector.signals import (
    EXPECTED_FINISH,
    DriftDecision,
    DriftObservation,
    Verdict,
    unserved_attempts,
)
from routemesh.services.drift_detector.store import (
    PIN_FILE,
    State,
)
from routemesh.services.router import PASSTHROUGH_ROUTE, WatchedConfig
from routemesh.services.runtime.consumer import (
    Delivery,
    OffsetTracker,
    PartitionKey,
    recent_event_ids,
)
from routemesh.services.runtime.files import FileWatch
from routemesh.services.runtime.service import ServiceContext, ServiceSpec, metrics_port
from routemesh.services.runtime.settings import ServiceSettings
from routemesh.services.runtime.state import SavedState

log = logging.getLogger(__name__)
GROUP = "routemesh-drift-detector"
# How often the routing config and the pinned baseline are checked for changes.
INPUTS_CHECK_S = 1.0
SEVERITY = {"insufficient_data": -1, "none": 0, "mild": 1, "severe": 2}


class DriftDetectorSettings(ServiceSettings):
    drift_preset: Preset = "normal"
    # Signals whose threshold differs from the preset's, by name (JSON object), e.g.
    # {"error_rate": 0.1}; checked against the preset's tables at start.
    drift_thresholds: dict[str, float] = {}
    # Observations per target model judged together.
    drift_window: int = Field(default=20, ge=4, le=10_000)
    # Routing events per route (and over all routes) in the current window; the baseline
    # is the window before it, or a pinned one.
    drift_routing_window: int = Field(default=500, ge=20, le=100_000)
    # Observations older than this (behind the model's newest) leave its window.
    drift_max_age_s: float | None = Field(default=None, gt=0)
    # Finish reasons of a healthy answer (JSON list in the environment variable).
    drift_expected_finish: frozenset[str] = EXPECTED_FINISH
    drift_state_dir: Path = Path("drift")
    # How often the state is saved (and offsets move) when no alert waits; 0: every batch.
    drift_snapshot_interval_s: float = Field(default=1.0, ge=0)
    # On a restart, how many of the newest alerts to read back to see which waiting ones
    # were already published.
    drift_alert_tail: int = Field(default=1000, ge=1)
    drift_batch_max_records: int = Field(default=2000, ge=1)
    drift_poll_ms: int = Field(default=100, ge=1)
    # The routing config names the known target models and routes; without it, the first
    # drift_max_subjects names seen each get a label and the rest are "other".
    router_config: Path | None = Path("deploy/examples/lite-deep.yaml")
    router_config_name: str | None = None
    drift_max_subjects: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _known_thresholds(self) -> DriftDetectorSettings:
        # Refused at start, naming the thresholds there are, not at the first event.
        thresholds(self.drift_preset, self.drift_thresholds)
        return self


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.severity = Gauge(
            "routemesh_drift_severity",
            "Drift verdict per subject: -1 insufficient data, 0 none, 1 mild, 2 severe",
            ["scope", "subject"], registry=registry)
        self.signal = Gauge(
            "routemesh_drift_signal", "Each drift signal's latest value (NaN: unknown)",
            ["scope", "subject", "signal"], registry=registry)
        self.threshold = Gauge(
            "routemesh_drift_signal_threshold", "The preset's threshold of each signal",
            ["scope", "signal"], registry=registry)
        self.samples = Gauge(
            "routemesh_drift_window_samples", "Events in the subject's current window",
            ["scope", "subject"], registry=registry)
        self.transitions = Counter(
            "routemesh_drift_transitions_total", "Verdict changes, by the verdict reached",
            ["scope", "verdict"], registry=registry)
        self.save = Histogram(
            "routemesh_drift_state_save_seconds", "Time to write the detector's state",
            registry=registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                        0.5, 1.0))


def _occurred_at(delivery: Delivery) -> datetime:
    return delivery.event.occurred_at


class DriftDetector:
    def __init__(self, ctx: ServiceContext) -> None:
        settings = ctx.settings
        assert isinstance(settings, DriftDetectorSettings)
        self.ctx = ctx
        self.settings = settings
        self.pin_path = settings.drift_state_dir / PIN_FILE
        self.detector = Detector(
            settings.drift_preset,
            window=settings.drift_window,
            routing_window=settings.drift_routing_window,
            max_age=timedelta(seconds=settings.drift_max_age_s)
            if settings.drift_max_age_s else None,
            expected_finish=settings.drift_expected_finish,
            max_subjects=settings.drift_max_subjects,
            overrides=settings.drift_thresholds,
        )
        self.metrics = _Metrics(ctx.registry)
        self.state = SavedState(settings.drift_state_dir, ctx.readiness, "drift_state",
                                self.metrics.save, settings.drift_snapshot_interval_s)
        self.consumer = ctx.consumer(
            [ROUTE_DECISIONS, LLM_OBSERVATIONS], GROUP, self,
            batch_max_records=settings.drift_batch_max_records, poll_ms=settings.drift_poll_ms,
            checkpoints=self.state.checkpoints,
        )
        self.outbox: list[DriftAlert] = []
        self._last_check = 0.0
        self.config = WatchedConfig(settings.router_config, settings.router_config_name)
        self._pin_watch = FileWatch([self.pin_path])

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        state = await self.state.restore(State)
        self._load_known()
        self._load_pin()
        if state is not None:
            self.detector.restore(state.detector)
            self.outbox = list(state.outbox)
            log.info("drift state restored", extra={
                "subjects": len(state.detector.subjects), "waiting_alerts": len(self.outbox)})
        if self.outbox:
            await self._publish_unconfirmed()
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()
        await self._save_and_publish(None)

    # -- handling ---------------------------------------------------------------------

    async def handle(self, deliveries: Sequence[Delivery], offsets: OffsetTracker) -> None:
        fresh = self.state.fresh(deliveries, offsets)
        # A poll brings each partition's events in turn; in their own time order a model's
        # answers are judged as they came, not one partition's after another's.
        fresh.sort(key=_occurred_at)
        for delivery in fresh:
            event = delivery.event
            if isinstance(event, CompletionObserved):
                served = msgspec.convert(event, DriftObservation, from_attributes=True)
                # One call is the served one: only a failover or an escalation adds others.
                attempts = unserved_attempts(event, served) if len(event.calls) > 1 else ()
                transitions = self.detector.add_observation(served, attempts)
            elif isinstance(event, RouteDecided):
                transitions = self.detector.add_decision(
                    msgspec.convert(event, DriftDecision, from_attributes=True))
            else:
                continue
            for transition in transitions:
                self.outbox.append(transition.alert(self.detector.preset,
                                                    self.detector.pinned_sha256))
                self.metrics.transitions.labels(transition.scope,
                                                transition.verdict.state).inc()
        now = time.monotonic()
        if now - self._last_check >= INPUTS_CHECK_S:
            self._last_check = now
            self._refresh_inputs()
        wanted = (self.state.unsaved and self.state.due(now)) or self.outbox
        if wanted and self.state.may_try(now):
            await self._save_and_publish(offsets)

    def revoked(self, partitions: Collection[PartitionKey]) -> None:
        self.state.revoked(partitions)

    # -- saving and publishing --------------------------------------------------------

    async def _save_and_publish(self, offsets: OffsetTracker | None) -> None:
        """Save the state, then publish what waits. When the disk or the broker fails,
        what is held stays held (nothing is rewound; the state in memory is whole) and
        the next poll after a backoff tries again."""
        try:
            if self.state.unsaved or self.outbox:
                snapshot, outbox = self.detector.snapshot(), list(self.outbox)
                await self.state.save(lambda covered, anchors: msgspec.msgpack.encode(State(
                    detector=snapshot, offsets=covered, anchors=anchors, outbox=outbox)))
                self._export(self.detector.judged())
            await self._publish()
        except Exception as exc:
            self.state.failed(exc, f"drift state not saved or {len(self.outbox)} alerts "
                                   "not published")
            return
        self.state.succeeded(offsets)

    async def _publish(self) -> None:
        while self.outbox:
            alert = self.outbox[0]
            await self.ctx.producer.publish(alert)
            log.info("drift alert", extra={
                "scope": alert.scope, "subject": alert.subject, "verdict": alert.verdict,
                "previous_verdict": alert.previous_verdict, "reason": alert.reason})
            self.outbox.pop(0)

    async def _publish_unconfirmed(self) -> None:
        """After a restart: publish the waiting alerts the topic does not hold yet."""
        published = await recent_event_ids(
            self.settings, self.settings.topic(DRIFT_ALERTS), self.settings.drift_alert_tail)
        waiting = [a for a in self.outbox if a.event_id not in published]
        log.info("waiting drift alerts", extra={
            "waiting": len(self.outbox), "already_published": len(self.outbox) - len(waiting)})
        self.outbox = waiting
        await self._save_and_publish(None)

    # -- inputs that may change while running -----------------------------------------

    def _refresh_inputs(self) -> None:
        if self.config.changed():
            self._load_known()
        if self._pin_watch.changed():
            self._load_pin()

    def _load_known(self) -> None:
        loaded = self.config.load()
        if loaded is None:
            return
        routes = loaded.config.routes
        self.detector.known({r.target_model for r in routes},
                            {r.id for r in routes} | {PASSTHROUGH_ROUTE})

    def _load_pin(self) -> None:
        try:
            data = self.pin_path.read_bytes()
        except FileNotFoundError:
            if self.detector.pinned is not None:
                log.info("pinned baseline removed; comparing with the preceding window")
            self.detector.pin(None)
            return
        try:
            pinned = msgspec.json.decode(data, type=Pinned)
        except msgspec.DecodeError as exc:
            log.error("pinned baseline not read; keeping the previous baseline",
                      extra={"error": str(exc)})
            return
        digest = hashlib.sha256(data).hexdigest()
        self.detector.pin(pinned, digest)
        log.info("pinned baseline in use", extra={"sha256": digest,
                                                  "decisions": len(pinned.decisions)})

    def _export(self, judged: dict[tuple[Scope, str], Verdict]) -> None:
        for (scope, subject), verdict in judged.items():
            self.metrics.severity.labels(scope, subject).set(SEVERITY[verdict.state])
            self.metrics.samples.labels(scope, subject).set(verdict.samples)
            for signal in verdict.signals:
                value = float("nan") if signal.value is None else signal.value
                self.metrics.signal.labels(scope, subject, signal.name).set(value)
                self.metrics.threshold.labels(scope, signal.name).set(signal.threshold)


SPEC = ServiceSpec(
    name="drift-detector",
    settings_class=DriftDetectorSettings,
    factory=DriftDetector,
    singleton="a window covers a subject's traffic on every partition, and a second "
              "instance would judge only the partitions it was given",
    ports=(metrics_port(9103),),
    description="drift verdicts per target model and route; alerts on every change",
    dev_env=lambda data_dir, instance: {"ROUTEMESH_DRIFT_STATE_DIR": str(data_dir / "drift")},
)
