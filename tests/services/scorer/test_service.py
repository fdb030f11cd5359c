"""The scorer's handler: the state saved before offsets move, a restart that restores
and skips, advice with a patch from the config, gauges and published scores."""

from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from routemesh.contracts import RouteScores
from routemesh.contracts.events import utc_now
from routemesh.services.runtime.changelog import MARK, fold
from routemesh.services.runtime.consumer import Delivery, OffsetTracker
from routemesh.services.runtime.telemetry import Readiness
from routemesh.services.scorer.service import Scorer, ScorerSettings
from routemesh.services.scorer.store import read_scorer_state as read_state

from .events import decided, observed, outcome

CONFIG = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "lite-deep.yaml"
TOPICS = {"RouteDecided": "t.route.decisions.v1", "CompletionObserved": "t.llm.observations.v1",
          "OutcomeReported": "t.route.outcomes.v1"}


class Producer:
    def __init__(self) -> None:
        self.published = []

    async def publish(self, event) -> None:
        self.published.append(event)


class Consumer(SimpleNamespace):
    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def scorer(tmp_path, **settings) -> Scorer:
    ctx = SimpleNamespace(
        settings=ScorerSettings(scorer_state_dir=tmp_path / "scorer", router_config=CONFIG,
                                topic_prefix="t.", scorer_snapshot_interval_s=0,
                                scorer_publish_interval_s=3600, **settings),
        registry=CollectorRegistry(), readiness=Readiness(), producer=Producer(),
        consumer=lambda topics, group_id, handler, **options: Consumer())
    return Scorer(ctx)


class Stream:
    """Events numbered by offset on their topics."""

    def __init__(self) -> None:
        self.next = dict.fromkeys(TOPICS.values(), 0)

    def deliveries(self, events) -> list[Delivery]:
        found = []
        for event in events:
            topic = TOPICS[type(event).__name__]
            found.append(Delivery(event, (topic, 0, self.next[topic])))
            self.next[topic] += 1
        return found


def traffic(n: int, start: int = 0):
    """Decisions for deep scored 0.57 (below lite-deep's 0.60) where deep was right."""
    at = utc_now() - timedelta(hours=1)
    for i in range(start, start + n):
        yield decided(f"r{i}", "deep", 0.57, at=at)
        yield observed(f"r{i}", at=at)
        yield outcome(f"r{i}", "deep", correct=False, at=at + timedelta(minutes=30))


async def test_the_state_covers_the_offsets_it_commits_and_a_restart_skips_them(tmp_path):
    first, stream, offsets = scorer(tmp_path), Stream(), OffsetTracker()
    await first.start()
    batch = stream.deliveries(traffic(40))
    for d in batch:
        offsets.consumed(d.position)
    await first.handle(batch, offsets)
    assert offsets.held_count() == 0
    assert offsets.to_commit() == {("t.route.decisions.v1", 0): 40,
                                   ("t.llm.observations.v1", 0): 40,
                                   ("t.route.outcomes.v1", 0): 40}
    state = read_state(tmp_path / "scorer")
    assert state.offsets == {"t.route.decisions.v1:0": 40, "t.llm.observations.v1:0": 40,
                             "t.route.outcomes.v1:0": 40}

    # A crash after the save: the same events come again with more, the state counts
    # each request once.
    again, replay = scorer(tmp_path), Stream()
    await again.start()
    more = replay.deliveries([*traffic(40), *traffic(30, start=40)])
    await again.handle(more, OffsetTracker())
    (label, scores), *_ = again.scores()
    assert label == "24h"
    assert (scores.decisions, scores.outcomes, scores.correct, scores.accuracy) == (70, 70, 0, 0.0)


async def test_advice_comes_with_a_patch_of_the_config_and_scores_are_published(tmp_path):
    service = scorer(tmp_path)
    await service.start()
    await service.handle(Stream().deliveries(traffic(60)), OffsetTracker())
    service.request_publish()
    await service.handle([], OffsetTracker())
    published = [e for e in service.ctx.producer.published if isinstance(e, RouteScores)]
    assert [e.window_seconds for e in published] == [24 * 3600, 168 * 3600, 720 * 3600]
    (advice,) = published[0].recommendations
    assert (advice.route_id, advice.current_threshold, advice.recommended_threshold) == (
        "deep", 0.60, 0.55)
    assert "-    threshold: 0.60\n+    threshold: 0.55" in advice.patch
    assert published[0].review_clusters[0].reason == "low_confidence"
    metrics = service.metrics
    assert metrics.accuracy.labels("24h", "route", "lite")._value.get() == 0.0
    assert metrics.feedback.labels("24h", "deep", "threshold_too_high")._value.get() == 60
    assert metrics.threshold.labels("24h", "deep", "recommended")._value.get() == 0.55
    assert metrics.target.labels("accuracy", "alert_below")._value.get() == 0.90


async def test_a_disk_that_fails_keeps_offsets_held_and_readiness_false(tmp_path, monkeypatch):
    service, offsets = scorer(tmp_path), OffsetTracker()
    await service.start()

    def broken(state_dir, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("routemesh.services.runtime.state.write_state", broken)
    batch = Stream().deliveries(traffic(5))
    for d in batch:
        offsets.consumed(d.position)
    await service.handle(batch, offsets)
    assert offsets.held_count() == 3
    ready, checks = service.ctx.readiness.snapshot()
    assert not ready
    assert "No space left" in checks["scorer_state"]["detail"]


@pytest.mark.parametrize("windows", [(1,), (6, 12)])
async def test_windows_are_configurable(tmp_path, windows):
    service = scorer(tmp_path, scorer_windows_h=windows)
    await service.start()
    assert [label for label, _ in service.scores()] == [f"{h}h" for h in windows]


class MemoryChangelog:
    """The changelog topic as the broker keeps it, in memory: records per partition."""

    def __init__(self) -> None:
        self.partitions: dict[int, list] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def write(self, partition, changes, mark) -> None:
        log = self.partitions.setdefault(partition, [])
        log += changes.items()
        log.append((MARK, mark))

    async def read(self, partitions):
        return {p: fold(self.partitions.get(p, [])) for p in partitions}


def partitioned(tmp_path, log: MemoryChangelog, held: set) -> Scorer:
    unit = scorer(tmp_path, scorer_state_store="changelog")
    unit.changelog = log
    unit.consumer = Consumer(assignment=lambda: held)
    return unit


async def test_a_partition_moves_with_its_ledger_and_its_offsets(tmp_path):
    """An instance counts partition 0 and saves it, and is killed before it commits: the
    next owner restores the ledger and skips what the ledger holds when it comes again."""
    log, inputs = MemoryChangelog(), {(t, 0) for t in TOPICS.values()}
    first = partitioned(tmp_path / "a", log, inputs)
    await first.start()
    await first.assigned(inputs)
    await first.handle(Stream().deliveries(traffic(40)), OffsetTracker())
    assert log.partitions[0], "saved on the changelog before anything is committed"

    second = partitioned(tmp_path / "b", log, inputs)
    await second.start()
    await second.assigned(inputs)
    assert second.state.checkpoints.offsets == {f"{t}:0": 40 for t in TOPICS.values()}
    # Delivered again from the last commit (none), with more.
    again = Stream().deliveries([*traffic(40), *traffic(30, start=40)])
    await second.handle(again, OffsetTracker())
    figures = second.figures()
    scores = figures.scores(utc_now(), timedelta(hours=24))
    assert (scores.decisions, scores.outcomes) == (70, 70)
    assert figures.duplicate_outcomes == 0, "nothing the moved ledger held counted twice"
    assert not (tmp_path / "b" / "scorer" / "state.msgpack").exists()


async def test_only_the_holder_of_partition_0_publishes(tmp_path):
    log = MemoryChangelog()
    others = partitioned(tmp_path / "a", log, {("t.route.decisions.v1", 1)})
    await others.start()
    others.request_publish()
    await others.publish()
    assert others.ctx.producer.published == []
    first = partitioned(tmp_path / "b", log, {("t.route.decisions.v1", 0)})
    first._caught_up.set()
    await first.start()
    await first.publish()
    assert len(first.ctx.producer.published) == 3, "one RouteScores per window"
