"""A partition's ledger saved key by key on the changelog and restored from it, and the
ledgers of separate partitions summed: both say what one ledger fed every event says."""

import random
import zlib
from datetime import timedelta

from routemesh.services.runtime.changelog import MARK, Restored, fold
from routemesh.services.scorer import changelog
from routemesh.services.scorer.advice import AdvicePolicy
from routemesh.services.scorer.ledger import Ledger, Limits

from .events import START, decided, observed, outcome
from .test_ledger import NOW, feed

DAY = timedelta(hours=24)
POLICY = AdvicePolicy.of(False, 5)


def traffic(n: int, seed: int = 3) -> list:
    rng = random.Random(seed)
    events = []
    for i in range(n):
        rid, at = f"r{i}", START + timedelta(seconds=30 * i)
        event = decided(rid, rng.choice(["lite", "deep"]), rng.uniform(0.3, 1.0), at=at,
                        latency_ms=rng.uniform(2, 40))
        events += [event, observed(rid, at=at)]
        if rng.random() < 0.7:
            truth = rng.choice(["lite", "deep"])
            events.append(outcome(rid, truth, correct=truth == event.route_id,
                                  at=at + timedelta(minutes=rng.uniform(0, 90))))
    rng.shuffle(events)
    return events


def partition(event) -> int:
    return zlib.crc32(event.request_id.encode()) % 6


def figures(ledger: Ledger):
    ledger.configure({"lite": 0.5, "deep": 0.5}, "lite", None)
    scores = ledger.scores(NOW, DAY, POLICY)
    return (scores.decisions, scores.outcomes, scores.correct, scores.accuracy,
            scores.p95_decision_latency_ms, scores.low_confidence_rate,
            [(r.route_id, r.decisions, r.outcomes, r.correct, r.mean_confidence,
              r.p95_decision_latency_ms) for r in scores.routes],
            [(layer.layer, layer.decisions, layer.outcomes) for layer in scores.layers],
            [(a.route_id, a.samples, a.recommended_threshold) for a in scores.recommendations],
            sorted(c.request_id for c in scores.review_candidates))


def test_the_ledgers_of_partitions_summed_say_what_one_ledger_says():
    events = traffic(900)
    one, parts = Ledger(), {p: Ledger() for p in range(6)}
    feed(one, events)
    for event in events:
        feed(parts[partition(event)], [event])
    assert figures(Ledger.merged(parts.values(), Limits())) == figures(one)


class FakeLog:
    """A partition's changelog as the broker keeps it: records in order."""

    def __init__(self) -> None:
        self.records: list[tuple[bytes, bytes | None]] = []

    def save(self, ledger: Ledger, offsets: dict[str, int]) -> None:
        self.records += changelog.changes(ledger, ledger.take_changes()).items()
        self.records.append((MARK, changelog.mark(ledger, offsets, {})))

    def restored(self) -> Restored:
        return fold(self.records)


def test_a_ledger_restored_from_its_changelog_counts_on_as_if_never_moved():
    events = traffic(600, seed=8)
    kept, log = Ledger(), FakeLog()
    for n, event in enumerate(events[:1000]):
        feed(kept, [event])
        if n % 97 == 0:
            log.save(kept, {"decisions:0": n + 1})
    log.save(kept, {"decisions:0": 1000})
    moved, mark = changelog.restore(log.restored(), Limits())
    assert mark.offsets == {"decisions:0": 1000}
    assert set(moved.pending) == set(kept.pending)
    feed(kept, events[1000:])
    feed(moved, events[1000:])
    assert figures(moved) == figures(kept)


def test_a_write_cut_short_is_left_out_and_superseded_by_the_next():
    kept, log = Ledger(), FakeLog()
    feed(kept, [decided("a", "deep", 0.9)])
    log.save(kept, {"decisions:0": 1})
    feed(kept, [decided("b", "deep", 0.9)])
    # A crash after the changes went out and before their mark.
    log.records += changelog.changes(kept, kept.take_changes()).items()
    moved, mark = changelog.restore(log.restored(), Limits())
    assert mark.offsets == {"decisions:0": 1}
    assert list(moved.pending) == ["a"]
    assert moved.scores(NOW, DAY).decisions == 1
    # The next save rewrites the torn keys as the restored ledger has them.
    log.save(moved, {"decisions:0": 1})
    again, _ = changelog.restore(log.restored(), Limits())
    assert list(again.pending) == ["a"]


def test_expired_requests_and_hours_leave_the_changelog():
    ledger, log = Ledger(Limits(max_pending=3, keep=timedelta(hours=2))), FakeLog()
    feed(ledger, [decided(f"r{i}", "deep", 0.9, at=START + timedelta(seconds=i))
                  for i in range(5)])
    ledger.expire(NOW)
    log.save(ledger, {})
    restored, _ = changelog.restore(log.restored(), Limits())
    assert list(restored.pending) == ["r2", "r3", "r4"]
    assert restored.buckets == {}, "the events' hour is older than what is kept"
