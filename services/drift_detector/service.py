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

With ``drift_state_store=changelog`` any number of instances share the work, as Kafka
Streams would: a subject's events arrive on every input partition, so each instance
re-keys the decisions and observations it is given by subject onto ``drift.inputs.v1``
(``Repartition``), and judges the subjects of the partitions of that topic it is given,
whose state it saves subject by subject on ``drift.changelog.v1`` (the same three steps,
the changelog in place of the file). A partition that moves is restored from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import msgspec
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import Field, model_validator

from routemesh.contracts import CompletionObserved, DriftAlert, DriftInput, Event, RouteDecided
from routemesh.contracts.topics import (
    DRIFT_ALERTS,
    DRIFT_CHANGELOG,
    DRIFT_INPUTS,
    LLM_OBSERVATIONS,
    ROUTE_DECISIONS,
)
from routemesh.services.drift_detector.detector import (
    SCOPES,
    Detector,
    Pinned,
    Scope,
    SubjectRecord,
    Transition,
    key_subject,
    subject_key,
)
from routemesh.services.drift_detector.presets import Preset, thresholds
from routemesh.services.drift_detector.signals import (
    EXPECTED_FINISH,
    DriftDecision,
    DriftObservation,
    Verdict,
    unserved_attempts,
)
from routemesh.services.drift_detector.store import PIN_FILE, Mark, State
from routemesh.services.router import PASSTHROUGH_ROUTE, WatchedConfig
from routemesh.services.runtime.changelog import Changelog
from routemesh.services.runtime.consumer import (
    Delivery,
    OffsetTracker,
    PartitionKey,
    covering,
    recent_event_ids,
)
from routemesh.services.runtime.files import FileWatch
from routemesh.services.runtime.service import ServiceContext, ServiceSpec, metrics_port
from routemesh.services.runtime.settings import ServiceSettings
from routemesh.services.runtime.state import SavedState

log = logging.getLogger(__name__)
GROUP = "routemesh-drift-detector"
# Scaled out: the group that judges the subjects re-keyed onto drift.inputs.v1.
SUBJECTS_GROUP = "routemesh-drift-subjects"
# The identity of an event's copy for one subject (DriftInput.event_id).
_INPUTS = uuid.UUID("6b1f7c52-0d7e-4a2b-9c51-3e8d2f4a6c17")
# How often the routing config and the pinned baseline are checked for changes.
INPUTS_CHECK_S = 1.0
SEVERITY = {"insufficient_data": -1, "none": 0, "mild": 1, "severe": 2}


# A route's record holds its routing window and baseline, of decisions and of
# observations; one this full must fit Kafka's default message size once compressed
# (tests/services/drift_detector/test_service.py builds one).
CHANGELOG_ROUTING_WINDOW = 5000


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
    # file: one instance, its state in drift_state_dir. changelog: any number of
    # instances, each subject's state on the compacted changelog topic (the pinned
    # baseline is still read from drift_state_dir).
    drift_state_store: Literal["file", "changelog"] = "file"
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

    @model_validator(mode="after")
    def _windows_fit_a_record(self) -> DriftDetectorSettings:
        if self.drift_state_store == "changelog" \
                and self.drift_routing_window > CHANGELOG_ROUTING_WINDOW:
            raise ValueError(
                f"ROUTEMESH_DRIFT_ROUTING_WINDOW is {self.drift_routing_window}, and with "
                f"the changelog store it may be at most {CHANGELOG_ROUTING_WINDOW}: a "
                "route's windows are one record on drift.changelog.v1, which must stay "
                "within Kafka's message size")
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


Views = tuple[DriftDecision | DriftObservation, list[DriftObservation]]


def views(event: Event) -> Views | None:
    """What the detector reads of a decision or an observation: the view, and for an
    observation the request's unserved attempts (``unserved_attempts``); None for any
    other event."""
    if isinstance(event, CompletionObserved):
        served = msgspec.convert(event, DriftObservation, from_attributes=True)
        # One call is the served one: only a failover or an escalation adds others.
        return served, unserved_attempts(event, served) if len(event.calls) > 1 else []
    if isinstance(event, RouteDecided):
        return msgspec.convert(event, DriftDecision, from_attributes=True), []
    return None


class Repartition:
    """Scaled out: each decision and observation once per subject it feeds, keyed by the
    subject onto drift.inputs.v1. Stateless: the input offsets are committed once the
    broker confirmed the copies (a crash before publishes them again, with the same
    identities, which the subjects' consumer drops)."""

    def __init__(self, ctx: ServiceContext, labels: Detector) -> None:
        self.ctx, self.labels = ctx, labels

    async def handle(self, deliveries: Sequence[Delivery], offsets: OffsetTracker) -> None:
        copies = [copy for delivery in deliveries for copy in self.copies(delivery.event)]
        await self.ctx.producer.publish_all(copies)

    def revoked(self, partitions: Collection[PartitionKey]) -> None:
        """Nothing is kept per partition."""

    def copies(self, event: Event) -> list[DriftInput]:
        viewed = views(event)
        if viewed is None:
            return []
        view, attempts = viewed
        decision = event if isinstance(event, RouteDecided) else None
        observation = event if isinstance(event, CompletionObserved) else None
        return [DriftInput(event_id=uuid.uuid5(_INPUTS, f"{event.event_id}|{scope}|{subject}"),
                           occurred_at=event.occurred_at, scope=scope, subject=subject,
                           decision=decision, observation=observation, answers=answers)
                for (scope, subject), answers in self.labels.fan_out(view, attempts).items()]


class DriftDetector:
    def __init__(self, ctx: ServiceContext) -> None:
        settings = ctx.settings
        assert isinstance(settings, DriftDetectorSettings)
        self.ctx = ctx
        self.settings = settings
        self.pin_path = settings.drift_state_dir / PIN_FILE
        # file: judges every subject. changelog: names subjects for the repartition; the
        # subjects are judged by one detector per drift.inputs.v1 partition held.
        self.detector = self._detector(None)
        self.detectors: dict[int, Detector] = {}
        self.metrics = _Metrics(ctx.registry)
        self.state = SavedState(settings.drift_state_dir, ctx.readiness, "drift_state",
                                self.metrics.save, settings.drift_snapshot_interval_s)
        self.changelog = (Changelog(settings, DRIFT_CHANGELOG, "drift-detector")
                          if settings.drift_state_store == "changelog" else None)
        options = {"batch_max_records": settings.drift_batch_max_records,
                   "poll_ms": settings.drift_poll_ms}
        if self.changelog is None:
            self.repartition = None
            self.consumer = ctx.consumer([ROUTE_DECISIONS, LLM_OBSERVATIONS], GROUP, self,
                                         checkpoints=self.state.checkpoints, **options)
        else:
            self.repartition = ctx.consumer([ROUTE_DECISIONS, LLM_OBSERVATIONS], GROUP,
                                            Repartition(ctx, self.detector), **options)
            self.consumer = ctx.consumer([DRIFT_INPUTS], SUBJECTS_GROUP, self,
                                         checkpoints=self.state.checkpoints,
                                         on_assigned=self.assigned, **options)
        # Alerts computed and not yet confirmed: the one detector's under 0, a scaled-out
        # detector's per partition.
        self.outboxes: dict[int, list[DriftAlert]] = {0: []} if self.changelog is None else {}
        # The signals exported per subject, so a subject that moves away leaves no gauge.
        self._exported: dict[tuple[Scope, str], set[str]] = {}
        self._last_check = 0.0
        self.config = WatchedConfig(settings.router_config, settings.router_config_name)
        self._pin_watch = FileWatch([self.pin_path])

    def _detector(self, like: Detector | None) -> Detector:
        """A detector from the settings, knowing the subjects and the pin ``like`` does."""
        settings = self.settings
        detector = Detector(
            settings.drift_preset,
            window=settings.drift_window,
            routing_window=settings.drift_routing_window,
            max_age=timedelta(seconds=settings.drift_max_age_s)
            if settings.drift_max_age_s else None,
            expected_finish=settings.drift_expected_finish,
            max_subjects=settings.drift_max_subjects,
            overrides=settings.drift_thresholds,
        )
        if like is not None:
            detector.known(like.known_models, like.known_routes)
            detector.pin(like.pinned, like.pinned_sha256)
        return detector

    def _judging(self) -> list[Detector]:
        return [self.detector] if self.changelog is None else list(self.detectors.values())

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self._load_known()
        self._load_pin()
        if self.changelog is None:
            state = await self.state.restore(State)
            if state is not None:
                self.detector.restore(state.detector)
                self.outboxes[0] = list(state.outbox)
                log.info("drift state restored", extra={
                    "subjects": len(state.detector.subjects),
                    "waiting_alerts": len(state.outbox)})
            if self.outboxes[0]:
                self.outboxes[0] = await self._publish_unconfirmed(self.outboxes[0])
                await self._save_and_publish(None)
        else:
            self.settings.drift_state_dir.mkdir(parents=True, exist_ok=True)
            self.state.kept_elsewhere()
            await self.changelog.start()
        await self.consumer.start()
        if self.repartition is not None:
            await self.repartition.start()

    async def stop(self) -> None:
        if self.repartition is not None:
            await self.repartition.stop()
        await self.consumer.stop()
        if self.changelog is None:
            await self._save_and_publish(None)
        else:
            # Not saved now: the group may have given the partitions to another instance
            # already, which restored them. What was not committed comes to it again.
            await self.changelog.stop()

    # -- handling ---------------------------------------------------------------------

    async def handle(self, deliveries: Sequence[Delivery], offsets: OffsetTracker) -> None:
        fresh = self.state.fresh(deliveries, offsets)
        # A poll brings each partition's events in turn; in their own time order a model's
        # answers are judged as they came, not one partition's after another's.
        fresh.sort(key=_occurred_at)
        for delivery in fresh:
            event = delivery.event
            if isinstance(event, DriftInput):
                partition = delivery.position[1]
                detector = self.detectors[partition]
                transitions = self._feed(detector, event)
            else:
                partition, detector = 0, self.detector
                viewed = views(event)
                if viewed is None:
                    continue
                view, attempts = viewed
                transitions = (detector.add_decision(view) if isinstance(view, DriftDecision)
                               else detector.add_observation(view, attempts))
            self._alert(detector, partition, transitions)
        now = time.monotonic()
        if now - self._last_check >= INPUTS_CHECK_S:
            self._last_check = now
            self._refresh_inputs()
        waiting = any(self.outboxes.values())
        wanted = (self.state.unsaved and self.state.due(now)) or waiting
        if wanted and self.state.may_try(now):
            await self._save_and_publish(offsets)

    @staticmethod
    def _feed(detector: Detector, event: DriftInput) -> list[Transition]:
        source = event.decision or event.observation
        viewed = None if source is None else views(source)
        if viewed is None:
            return []
        view, attempts = viewed
        return detector.feed(event.scope, event.subject, view, attempts, event.answers)

    def _alert(self, detector: Detector, partition: int,
               transitions: list[Transition]) -> None:
        for transition in transitions:
            self.outboxes[partition].append(transition.alert(detector.preset,
                                                             detector.pinned_sha256))
            self.metrics.transitions.labels(transition.scope, transition.verdict.state).inc()

    async def assigned(self, partitions: Collection[PartitionKey]) -> None:
        """Restore the subjects of partitions given to this instance from the changelog,
        with the offsets they cover and the alerts they had waiting, before their first
        events are judged."""
        assert self.changelog is not None
        new = {p for _, p in partitions} - set(self.detectors)
        if not new:
            return
        started = time.perf_counter()
        restored = await self.changelog.read(new)
        subjects = 0
        for p, found in restored.items():
            detector = self._detector(self.detector)
            for key, value in found.values.items():
                detector.put(*key_subject(key),
                             msgspec.msgpack.decode(value, type=SubjectRecord))
                subjects += 1
            # Keys a cut write left behind are older than the mark's offsets: the events
            # after it come again and write them anew.
            mark = Mark() if found.mark is None else msgspec.msgpack.decode(found.mark,
                                                                             type=Mark)
            detector.state.config = mark.config
            self.detectors[p] = detector
            self.outboxes[p] = await self._publish_unconfirmed(mark.outbox)
            self.state.checkpoints.adopt([self._input(p)], mark.offsets, mark.anchors)
        log.info("drift state restored from the changelog",
                 extra={"partitions": sorted(new), "subjects": subjects,
                        "seconds": round(time.perf_counter() - started, 3)})

    def revoked(self, partitions: Collection[PartitionKey]) -> None:
        self.state.revoked(partitions)
        if self.changelog is None:
            return
        # What was not saved is delivered again to the partition's next owner.
        for p in {p for _, p in partitions}:
            detector = self.detectors.pop(p, None)
            self.outboxes.pop(p, None)
            self.state.checkpoints.forget([self._input(p)])
            if detector is not None:
                for scope in SCOPES:
                    for subject in detector.state.subjects.get(scope, {}):
                        self._unexport(scope, subject)

    def _input(self, partition: int) -> PartitionKey:
        return self.settings.topic(DRIFT_INPUTS), partition

    # -- saving and publishing --------------------------------------------------------

    async def _save_and_publish(self, offsets: OffsetTracker | None) -> None:
        """Save the state, then publish what waits. When the disk or the broker fails,
        what is held stays held (nothing is rewound; the state in memory is whole) and
        the next poll after a backoff tries again."""
        try:
            if self.state.unsaved or any(self.outboxes.values()):
                if self.changelog is None:
                    snapshot, outbox = self.detector.snapshot(), list(self.outboxes[0])
                    await self.state.save(lambda covered, anchors: msgspec.msgpack.encode(
                        State(detector=snapshot, offsets=covered, anchors=anchors,
                              outbox=outbox)))
                else:
                    await self.state.save_with(self._write_changelog)
                for detector in self._judging():
                    self._export(detector.judged())
            await self._publish()
        except (OSError, KafkaError) as exc:
            waiting = sum(len(outbox) for outbox in self.outboxes.values())
            self.state.failed(exc, f"drift state not saved or {waiting} alerts not published")
            return
        self.state.succeeded(offsets)

    async def _write_changelog(self, covered: dict[str, int], anchors: dict[str, str]
                               ) -> None:
        """Each partition's subjects fed since its last save, then its mark: the offsets
        they cover and the alerts waiting."""
        assert self.changelog is not None
        writes = []
        fed: dict[int, set[tuple[Scope, str]]] = {}
        for p, detector in self.detectors.items():
            fed[p] = detector.take_fed()
            # Every event feeds a subject: a partition fed nothing has nothing new to cover.
            if not fed[p] and not self.outboxes[p]:
                continue
            changes: dict[bytes, bytes | None] = {
                subject_key(scope, subject): msgspec.msgpack.encode(
                    detector.record(scope, subject)) for scope, subject in fed[p]}
            offsets, marked = covering([self._input(p)], covered, anchors)
            mark = Mark(offsets=offsets, anchors=marked, outbox=list(self.outboxes[p]),
                        config=detector.state.config)
            writes.append(self.changelog.write(p, changes, msgspec.msgpack.encode(mark)))
        try:
            await asyncio.gather(*writes)
        except BaseException:
            for p, subjects in fed.items():
                if p in self.detectors:
                    self.detectors[p].refeed(subjects)
            raise

    async def _publish(self) -> None:
        for outbox in self.outboxes.values():
            while outbox:
                alert = outbox[0]
                await self.ctx.producer.publish(alert)
                log.info("drift alert", extra={
                    "scope": alert.scope, "subject": alert.subject, "verdict": alert.verdict,
                    "previous_verdict": alert.previous_verdict, "reason": alert.reason})
                outbox.pop(0)

    async def _publish_unconfirmed(self, outbox: list[DriftAlert]) -> list[DriftAlert]:
        """After a restart or a move: the waiting alerts the topic does not hold yet."""
        if not outbox:
            return []
        published = await recent_event_ids(
            self.settings, self.settings.topic(DRIFT_ALERTS), self.settings.drift_alert_tail)
        waiting = [a for a in outbox if a.event_id not in published]
        log.info("waiting drift alerts", extra={
            "waiting": len(outbox), "already_published": len(outbox) - len(waiting)})
        return waiting

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
        for detector in [self.detector, *self.detectors.values()]:
            detector.known({r.target_model for r in routes},
                           {r.id for r in routes} | {PASSTHROUGH_ROUTE})

    def _load_pin(self) -> None:
        try:
            data = self.pin_path.read_bytes()
        except FileNotFoundError:
            if self.detector.pinned is not None:
                log.info("pinned baseline removed; comparing with the preceding window")
            self._pin(None, None)
            return
        try:
            pinned = msgspec.json.decode(data, type=Pinned)
        except msgspec.DecodeError as exc:
            log.error("pinned baseline not read; keeping the previous baseline",
                      extra={"error": str(exc)})
            return
        digest = hashlib.sha256(data).hexdigest()
        self._pin(pinned, digest)
        log.info("pinned baseline in use", extra={"sha256": digest,
                                                  "decisions": len(pinned.decisions)})

    def _pin(self, pinned: Pinned | None, digest: str | None) -> None:
        for detector in [self.detector, *self.detectors.values()]:
            detector.pin(pinned, digest)

    def _export(self, judged: dict[tuple[Scope, str], Verdict]) -> None:
        for (scope, subject), verdict in judged.items():
            self.metrics.severity.labels(scope, subject).set(SEVERITY[verdict.state])
            self.metrics.samples.labels(scope, subject).set(verdict.samples)
            exported = self._exported.setdefault((scope, subject), set())
            for signal in verdict.signals:
                value = float("nan") if signal.value is None else signal.value
                self.metrics.signal.labels(scope, subject, signal.name).set(value)
                self.metrics.threshold.labels(scope, signal.name).set(signal.threshold)
                exported.add(signal.name)

    def _unexport(self, scope: Scope, subject: str) -> None:
        """A subject another instance judges now: its gauges are that one's."""
        for name in self._exported.pop((scope, subject), set()):
            self.metrics.signal.remove(scope, subject, name)
        for gauge in (self.metrics.severity, self.metrics.samples):
            with contextlib.suppress(KeyError):
                gauge.remove(scope, subject)


SPEC = ServiceSpec(
    name="drift-detector",
    settings_class=DriftDetectorSettings,
    factory=DriftDetector,
    scale_out_env={"ROUTEMESH_DRIFT_STATE_STORE": "changelog"},
    ports=(metrics_port(9103),),
    description="drift verdicts per target model and route; alerts on every change",
    dev_env=lambda data_dir, instance: {"ROUTEMESH_DRIFT_STATE_DIR": str(data_dir / "drift")},
)
