"""The scorer service: join decisions, observations and outcomes; keep the figures per
route and layer over rolling windows; publish them as RouteScores every
``scorer_publish_interval_s`` and on SIGUSR1; export them as gauges.

Durability: the ledger and the offsets it covers are saved atomically (at most every
``scorer_snapshot_interval_s``) before those offsets are committed, so a crash
redelivers exactly what the saved state lacks and a restart skips what it holds. A
RouteScores is a snapshot of figures: one published twice around a crash says the same.

Where the state is kept (``scorer_state_store``): ``file``, one instance's ledger in its
state directory; or ``changelog``, a ledger per input partition saved key by key on
``scorer.changelog.v1``, so instances share the partitions and a partition's ledger moves
with it. Then the instance given partition 0 of the decisions publishes, alone: its own
ledgers summed with the others' as it follows them on the changelog.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import msgspec
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import Field

from routemesh.contracts import (
    CompletionObserved,
    LayerScore,
    OutcomeReported,
    RouteDecided,
    RouteScore,
    RouteScores,
)
from routemesh.contracts.events import utc_now
from routemesh.contracts.topics import (
    LLM_OBSERVATIONS,
    ROUTE_DECISIONS,
    ROUTE_OUTCOMES,
    SCORER_CHANGELOG,
)
from routemesh.services.router import WatchedConfig
from routemesh.services.runtime.changelog import Changelog
from routemesh.services.runtime.consumer import (
    Delivery,
    OffsetTracker,
    PartitionKey,
    covering,
)
from routemesh.services.runtime.service import ServiceContext, ServiceSpec, metrics_port
from routemesh.services.runtime.settings import ServiceSettings
from routemesh.services.runtime.state import SavedState
from routemesh.services.scorer import changelog, patch
from routemesh.services.scorer.advice import AdvicePolicy
from routemesh.services.scorer.candidates import REASONS, CandidatePolicy
from routemesh.services.scorer.ledger import Changes, Ledger, Limits
from routemesh.services.scorer.store import State
from routemesh.services.scorer.views import view

log = logging.getLogger(__name__)
GROUP = "routemesh-scorer"
INPUTS_CHECK_S = 1.0
INPUTS = (ROUTE_DECISIONS, LLM_OBSERVATIONS, ROUTE_OUTCOMES)


class ScorerSettings(ServiceSettings):
    # Rolling windows, in hours.
    scorer_windows_h: tuple[int, ...] = (24, 168, 720)
    scorer_publish_interval_s: float = Field(default=300.0, gt=0)
    # How often the state is saved (and offsets move); 0: every poll.
    scorer_snapshot_interval_s: float = Field(default=5.0, ge=0)
    # file: one instance, its state in scorer_state_dir. changelog: any number of
    # instances, each partition's state on the compacted changelog topic.
    scorer_state_store: Literal["file", "changelog"] = "file"
    scorer_state_dir: Path = Path("scorer")
    # How long (by event time) a request waits for its outcome, and how many may wait.
    scorer_join_horizon_s: float = Field(default=72 * 3600.0, gt=0)
    scorer_max_pending: int = Field(default=200_000, ge=1)
    scorer_max_candidates: int = Field(default=5_000, ge=1)
    scorer_published_candidates: int = Field(default=100, ge=0)
    scorer_published_clusters: int = Field(default=50, ge=0)
    # Threshold advice: outcomes a route needs first, and larger steps when aggressive.
    scorer_min_samples: int = Field(default=50, ge=1)
    scorer_aggressive: bool = False
    # Review candidates.
    scorer_near_threshold: float = Field(default=0.05, ge=0)
    scorer_near_margin: float = Field(default=0.02, ge=0)
    scorer_slow_ms: float = Field(default=30_000.0, gt=0)
    scorer_max_routes: int = Field(default=100, ge=1)
    scorer_batch_max_records: int = Field(default=2000, ge=1)
    scorer_poll_ms: int = Field(default=100, ge=1)
    # Health targets, exported as gauges for alert rules to compare with: the target a
    # healthy mesh meets, and the bound past which an alert fires.
    scorer_accuracy_target: float = 0.95
    scorer_accuracy_alert_below: float = 0.90
    scorer_rules_capture_target: float = 0.30
    scorer_rules_capture_alert_below: float = 0.20
    scorer_semantic_capture_target: float = 0.40
    scorer_semantic_capture_alert_below: float = 0.30
    scorer_decision_latency_target_s: float = 0.100
    scorer_decision_latency_alert_above_s: float = 0.200
    scorer_low_confidence_target: float = 0.05
    scorer_low_confidence_alert_above: float = 0.10
    # The routing config gives the current thresholds, the fallback route and the patch
    # target; without it, thresholds are read from the decisions.
    router_config: Path | None = Path("deploy/examples/lite-deep.yaml")
    router_config_name: str | None = None

    def targets(self) -> dict[tuple[str, str], float]:
        return {
            ("accuracy", "target"): self.scorer_accuracy_target,
            ("accuracy", "alert_below"): self.scorer_accuracy_alert_below,
            ("rules_capture", "target"): self.scorer_rules_capture_target,
            ("rules_capture", "alert_below"): self.scorer_rules_capture_alert_below,
            ("semantic_capture", "target"): self.scorer_semantic_capture_target,
            ("semantic_capture", "alert_below"): self.scorer_semantic_capture_alert_below,
            ("decision_latency_p95_seconds", "target"): self.scorer_decision_latency_target_s,
            ("decision_latency_p95_seconds", "alert_above"):
                self.scorer_decision_latency_alert_above_s,
            ("low_confidence", "target"): self.scorer_low_confidence_target,
            ("low_confidence", "alert_above"): self.scorer_low_confidence_alert_above,
        }

    def limits(self) -> Limits:
        return Limits(
            horizon=timedelta(seconds=self.scorer_join_horizon_s),
            max_pending=self.scorer_max_pending, max_candidates=self.scorer_max_candidates,
            keep=timedelta(hours=max(self.scorer_windows_h)),
            max_routes=self.scorer_max_routes,
            candidate_policy=CandidatePolicy(threshold_band=self.scorer_near_threshold,
                                             margin_band=self.scorer_near_margin,
                                             slow_ms=self.scorer_slow_ms),
        )


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        scoped = ["window", "scope", "subject"]

        def gauge(name: str, doc: str, labels: list[str] = scoped) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        self.decisions = gauge("routemesh_scorer_decisions",
                               "Decisions in the window (scope: route, layer or all)")
        self.outcomes = gauge("routemesh_scorer_outcomes", "Outcomes joined in the window")
        self.accuracy = gauge("routemesh_scorer_accuracy_ratio",
                              "Correct routes / outcomes that say (NaN: none say)")
        self.capture = gauge("routemesh_scorer_capture_ratio",
                             "Share of all decisions made by this route or layer")
        self.confidence = gauge("routemesh_scorer_mean_confidence",
                                "Mean decision score in the window")
        self.latency = gauge("routemesh_scorer_decision_latency_p95_seconds",
                             "p95 decision latency in the window (to 2 %)")
        self.low_confidence = gauge("routemesh_scorer_low_confidence_ratio",
                                    "Low-confidence fallbacks / decisions", ["window"])
        self.feedback = gauge("routemesh_scorer_feedback",
                              "Outcomes per learning feedback class",
                              ["window", "route", "feedback"])
        self.threshold = gauge("routemesh_scorer_threshold",
                               "A route's threshold: current and recommended",
                               ["window", "route", "kind"])
        self.candidates = gauge("routemesh_scorer_review_candidates",
                                "Review candidates in the window by reason",
                                ["window", "reason"])
        self.target = gauge("routemesh_scorer_health_target",
                            "Health targets and alert bounds for the scorer's figures",
                            ["figure", "bound"])
        self.pending = Gauge("routemesh_scorer_pending_requests",
                             "Requests waiting for the rest of their events",
                             registry=registry)
        self.unmatched = Gauge("routemesh_scorer_unmatched_outcomes",
                               "Outcomes whose decision never came within the horizon",
                               registry=registry)
        self.duplicates = Gauge("routemesh_scorer_duplicate_outcomes",
                                "Further outcomes for a request already scored",
                                registry=registry)
        self.published = Counter("routemesh_scorer_published_total",
                                 "RouteScores published", ["window"], registry=registry)
        self.save: Histogram = Histogram(
            "routemesh_scorer_state_save_seconds", "Time to write the scorer's state",
            registry=registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                        0.5, 1.0, 2.5, 5.0))

    def scores(self) -> list[Gauge]:
        """The gauges of the published figures: only the publishing instance has them."""
        return [self.decisions, self.outcomes, self.accuracy, self.capture, self.confidence,
                self.latency, self.low_confidence, self.feedback, self.threshold,
                self.candidates]


def _window_label(hours: int) -> str:
    return f"{hours}h"


class Scorer:
    def __init__(self, ctx: ServiceContext) -> None:
        settings = ctx.settings
        assert isinstance(settings, ScorerSettings)
        self.ctx = ctx
        self.settings = settings
        self.limits = settings.limits()
        # A partition's ledger waits for its share of the requests and keeps its share of
        # the candidates: an instance holding every partition holds what one ledger would.
        shares = SCORER_CHANGELOG.partitions
        self.partition_limits = dataclasses.replace(
            self.limits, max_pending=math.ceil(self.limits.max_pending / shares),
            max_candidates=math.ceil(self.limits.max_candidates / shares))
        # file: the one ledger of every partition. changelog: a ledger per partition held.
        self.ledger = Ledger(self.limits)
        self.ledgers: dict[int, Ledger] = {}
        # The publisher's copy of the other partitions' figures, as their owners save them.
        self.views: dict[int, Ledger] = {}
        self.policy = AdvicePolicy.of(settings.scorer_aggressive, settings.scorer_min_samples)
        self.metrics = _Metrics(ctx.registry)
        self.state = SavedState(settings.scorer_state_dir, ctx.readiness, "scorer_state",
                                self.metrics.save, settings.scorer_snapshot_interval_s)
        self.changelog = (Changelog(settings, SCORER_CHANGELOG, "scorer")
                          if settings.scorer_state_store == "changelog" else None)
        self.consumer = ctx.consumer(
            list(INPUTS), GROUP, self,
            batch_max_records=settings.scorer_batch_max_records,
            poll_ms=settings.scorer_poll_ms, checkpoints=self.state.checkpoints,
            on_assigned=None if self.changelog is None else self.assigned,
        )
        self.config = WatchedConfig(settings.router_config, settings.router_config_name)
        self._config_path: Path | None = None
        self._configured: tuple[dict[str, float], str, str | None] | None = None
        self._last_check = self._last_publish = time.monotonic()
        self._publish_now = False
        self._following: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self._load_config()
        if self.changelog is None:
            state = await self.state.restore(State)
            if state is not None:
                self.ledger.restore(state.ledger)
                self._configure(self.ledger)
                log.info("scorer state restored", extra={"pending": len(self.ledger.pending)})
            for label, scores in self.scores():
                self._export(label, scores)
        else:
            self.state.kept_elsewhere()
            await self.changelog.start()
        for (figure, bound), value in self.settings.targets().items():
            self.metrics.target.labels(figure, bound).set(value)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.request_publish)
        await self.consumer.start()

    async def stop(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        await self.consumer.stop()
        if self.changelog is None:
            await self._save(None)
        else:
            # Not saved now: the group may have given the partitions to another instance
            # already, which restored them. What was not committed comes to it again.
            await self._follow(False)
            await self.changelog.stop()

    def request_publish(self) -> None:
        """Publish the figures on the next poll (SIGUSR1)."""
        self._publish_now = True

    # -- handling ---------------------------------------------------------------------

    async def handle(self, deliveries: Sequence[Delivery], offsets: OffsetTracker) -> None:
        for delivery in self.state.fresh(deliveries, offsets):
            event = delivery.event
            ledger = self.ledger if self.changelog is None else \
                self.ledgers[delivery.position[1]]
            if isinstance(event, RouteDecided):
                ledger.add_decision(view(event))
            elif isinstance(event, CompletionObserved):
                ledger.add_observation(view(event), event.occurred_at)
            elif isinstance(event, OutcomeReported):
                ledger.add_outcome(view(event))
        now = time.monotonic()
        if now - self._last_check >= INPUTS_CHECK_S:
            self._last_check = now
            if self.config.changed():
                self._load_config()
            await self._follow(self.publishes)
        if self.state.unsaved and self.state.due(now) and self.state.may_try(now):
            await self._save(offsets)
        # Figures may include events not saved yet: after a crash they are counted again
        # into the saved state, so what is published next says the same.
        if self._publish_now or now - self._last_publish >= \
                self.settings.scorer_publish_interval_s:
            await self.publish()

    async def assigned(self, partitions: Collection[PartitionKey]) -> None:
        """Restore the ledgers of partitions given to this instance from the changelog,
        with the offsets they cover, before their first events are counted."""
        assert self.changelog is not None
        new = {p for _, p in partitions} - set(self.ledgers)
        if not new:
            return
        started = time.perf_counter()
        restored = await self.changelog.read(new)
        pending = 0
        for p, found in restored.items():
            ledger, mark = changelog.restore(found, self.partition_limits)
            self._configure(ledger)
            self.ledgers[p] = ledger
            self.state.checkpoints.adopt(self._inputs(p), mark.offsets, mark.anchors)
            pending += len(ledger.pending)
        log.info("scorer state restored from the changelog",
                 extra={"partitions": sorted(new), "pending": pending,
                        "seconds": round(time.perf_counter() - started, 3)})

    def revoked(self, partitions: Collection[PartitionKey]) -> None:
        self.state.revoked(partitions)
        if self.changelog is None:
            return
        # What was not saved is delivered again to the partition's next owner.
        for p in {p for _, p in partitions}:
            self.ledgers.pop(p, None)
            self.state.checkpoints.forget(self._inputs(p))

    def _inputs(self, partition: int) -> list[PartitionKey]:
        return [(self.settings.topic(t), partition) for t in INPUTS]

    # -- saving and publishing --------------------------------------------------------

    async def _save(self, offsets: OffsetTracker | None) -> None:
        """Save the ledger with the offsets it covers, then release what waited for it
        (``offsets`` None: the consumer has stopped)."""
        now = utc_now()
        try:
            if self.changelog is None:
                self.ledger.expire(now)
                self.ledger.take_changes()
                snapshot = self.ledger.snapshot()
                await self.state.save(lambda covered, anchors: msgspec.msgpack.encode(
                    State(ledger=snapshot, offsets=covered, anchors=anchors)))
            else:
                await self._save_changelog(now)
        except (OSError, KafkaError) as exc:
            self.state.failed(exc, "scorer state not saved")
            return
        self.state.succeeded(offsets)
        held = [self.ledger] if self.changelog is None else list(self.ledgers.values())
        self.metrics.pending.set(sum(len(ledger.pending) for ledger in held))
        self.metrics.unmatched.set(sum(ledger.unmatched_outcomes for ledger in held))
        self.metrics.duplicates.set(sum(ledger.duplicate_outcomes for ledger in held))

    async def _save_changelog(self, now: datetime) -> None:
        assert self.changelog is not None
        taken: dict[int, Changes] = {}
        for p, ledger in self.ledgers.items():
            ledger.expire(now)
            # Every event changes its request: a partition without changes has nothing
            # new to cover either.
            if changed := ledger.take_changes():
                taken[p] = changed

        async def write(covered: dict[str, int], anchors: dict[str, str]) -> None:
            assert self.changelog is not None
            writes = []
            for p, changed in taken.items():
                ledger = self.ledgers[p]
                writes.append(self.changelog.write(
                    p, changelog.changes(ledger, changed),
                    changelog.mark(ledger, *covering(self._inputs(p), covered, anchors))))
            await asyncio.gather(*writes)
        try:
            await self.state.save_with(write)
        except BaseException:
            for p, changed in taken.items():
                self.ledgers[p].changes.add(changed)
            raise

    @property
    def publishes(self) -> bool:
        """Whether this instance publishes: the only one, or the one given partition 0
        of the decisions (so two never publish different figures for one window)."""
        return self.changelog is None or \
            (self.settings.topic(ROUTE_DECISIONS), 0) in self.consumer.assignment()

    async def _follow(self, wanted: bool) -> None:
        """Follow the changelog while this instance publishes; forget it, and its
        gauges, when another does."""
        if self._following is not None and self._following.done():
            failure = None if self._following.cancelled() else self._following.exception()
            log.error("following the changelog stopped; starting over",
                      extra={"error": str(failure)})
            self._following = None
        if self.changelog is None or wanted == (self._following is not None):
            return
        if wanted:
            self.views.clear()
            self._caught_up.clear()
            self._following = asyncio.create_task(
                self.changelog.follow(self._viewed, self._caught_up), name="scorer-follow")
            return
        assert self._following is not None
        self._following.cancel()
        with contextlib.suppress(asyncio.CancelledError, KafkaError):
            await self._following
        self._following = None
        self.views.clear()
        for gauge in self.metrics.scores():
            gauge.clear()

    def _viewed(self, partition: int, key: bytes, value: bytes | None) -> None:
        view_ = self.views.get(partition)
        if view_ is None:
            view_ = self.views[partition] = Ledger(self.limits)
        changelog.apply(view_, key, value, joins=False)

    def figures(self) -> Ledger:
        """The ledger the figures are read from: the one, or every partition's summed
        (a partition held here from its ledger, any other from the changelog)."""
        if self.changelog is None:
            return self.ledger
        parts = {**self.views, **self.ledgers}
        merged = Ledger.merged(parts.values(), self.limits)
        self._configure(merged)
        return merged

    def scores(self) -> list[tuple[str, RouteScores]]:
        now = utc_now()
        figures = self.figures()
        return [
            (_window_label(hours),
             figures.scores(now, timedelta(hours=hours), self.policy,
                            self.settings.scorer_published_candidates,
                            self.settings.scorer_published_clusters, self._patch))
            for hours in self.settings.scorer_windows_h
        ]

    async def publish(self) -> None:
        self._last_publish = time.monotonic()
        if not self.publishes:
            self._publish_now = False
            return
        if self.changelog is not None and not self._caught_up.is_set():
            log.info("route scores wait for the changelog to be read")
            return
        self._publish_now = False
        for label, scores in self.scores():
            self._export(label, scores)
            try:
                await self.ctx.producer.publish(scores)
            except Exception as exc:
                log.error("route scores not published", extra={"error": str(exc)})
                return
            self.metrics.published.labels(label).inc()
        log.info("route scores published", extra={"windows": list(self.settings.scorer_windows_h)})

    def _export(self, window: str, scores: RouteScores) -> None:
        m = self.metrics
        nan = float("nan")

        def put(scope: str, subject: str, figures: RouteScores | RouteScore | LayerScore
                ) -> None:
            m.decisions.labels(window, scope, subject).set(figures.decisions)
            m.outcomes.labels(window, scope, subject).set(figures.outcomes)
            m.accuracy.labels(window, scope, subject).set(
                nan if figures.accuracy is None else figures.accuracy)
            latency = figures.p95_decision_latency_ms
            m.latency.labels(window, scope, subject).set(
                nan if latency is None else latency / 1000)

        put("all", "all", scores)
        for route in scores.routes:
            put("route", route.route_id, route)
            m.capture.labels(window, "route", route.route_id).set(route.capture_rate or 0.0)
            m.confidence.labels(window, "route", route.route_id).set(
                nan if route.mean_confidence is None else route.mean_confidence)
            for name in ("correct_routing", "threshold_too_high", "threshold_too_low"):
                m.feedback.labels(window, route.route_id, name).set(getattr(route, name))
        for layer in scores.layers:
            put("layer", layer.layer, layer)
            m.capture.labels(window, "layer", layer.layer).set(layer.capture_rate or 0.0)
            m.confidence.labels(window, "layer", layer.layer).set(
                nan if layer.mean_confidence is None else layer.mean_confidence)
        m.low_confidence.labels(window).set(
            nan if scores.low_confidence_rate is None else scores.low_confidence_rate)
        for advice in scores.recommendations:
            m.threshold.labels(window, advice.route_id, "current").set(advice.current_threshold)
            m.threshold.labels(window, advice.route_id, "recommended").set(
                advice.recommended_threshold)
        counts: dict[str, int] = dict.fromkeys(REASONS, 0)
        for cluster in scores.review_clusters:
            counts[cluster.reason] = counts.get(cluster.reason, 0) + cluster.size
        for reason, count in counts.items():
            m.candidates.labels(window, reason).set(count)

    # -- the routing config -----------------------------------------------------------

    def _load_config(self) -> None:
        loaded = self.config.load()
        if loaded is None:
            return
        config = loaded.config
        self._configured = ({r.id: r.threshold for r in config.routes},
                            config.default_route, loaded.sha256)
        for ledger in (self.ledger, *self.ledgers.values()):
            self._configure(ledger)
        self._config_path = self.config.path

    def _configure(self, ledger: Ledger) -> None:
        if self._configured is not None:
            ledger.configure(*self._configured)

    def _patch(self, route_id: str, threshold: float) -> str:
        if self._config_path is None:
            return ""
        try:
            return patch.diff(self._config_path, patch.ConfigChange({route_id: threshold}))
        except (OSError, KeyError, ValueError) as exc:
            log.warning("no patch for the advice", extra={"error": str(exc)})
            return ""


SPEC = ServiceSpec(
    name="scorer",
    settings_class=ScorerSettings,
    factory=Scorer,
    scale_out_env={"ROUTEMESH_SCORER_STATE_STORE": "changelog"},
    ports=(metrics_port(9104),),
    description="accuracy per route and layer from outcomes; threshold advice; review "
                "candidates",
    dev_env=lambda data_dir, instance: {"ROUTEMESH_SCORER_STATE_DIR": str(data_dir / "scorer")},
)
