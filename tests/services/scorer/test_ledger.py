import random
from datetime import timedelta

import msgspec
import pytest

from routemesh.services.scorer.ledger import Ledger, Limits, Snapshot
from routemesh.services.scorer.views import view

from .events import START, decided, observed, outcome, ruled

NOW = START + timedelta(hours=6)
DAY = timedelta(hours=24)


def feed(ledger, events):
    for event in events:
        v = view(event)
        if type(event).__name__ == "RouteDecided":
            ledger.add_decision(v)
        elif type(event).__name__ == "CompletionObserved":
            ledger.add_observation(v, event.occurred_at)
        else:
            ledger.add_outcome(v)


def route(scores, route_id):
    return next(r for r in scores.routes if r.route_id == route_id)


def test_late_outcomes_join_their_decision_and_early_ones_wait():
    ledger = Ledger()
    feed(ledger, [decided("a", "deep", 0.9), outcome("b", "deep"),
                  decided("b", "deep", 0.9), outcome("a", "lite", at=START + timedelta(hours=5))])
    deep = route(ledger.scores(NOW, DAY), "deep")
    assert (deep.decisions, deep.outcomes, deep.correct, deep.accuracy) == (2, 2, 1, 0.5)


def test_a_duplicate_outcome_counts_once_and_a_missing_one_not_at_all():
    ledger = Ledger()
    feed(ledger, [decided("a", "deep", 0.9), decided("b", "deep", 0.9),
                  outcome("a", "deep"), outcome("a", "lite"), decided("a", "deep", 0.9)])
    scores = ledger.scores(NOW, DAY)
    assert (scores.decisions, scores.outcomes, scores.correct) == (2, 1, 1)
    assert ledger.duplicate_outcomes == 1


def test_an_outcome_whose_decision_never_comes_expires_unmatched():
    ledger = Ledger(Limits(horizon=timedelta(hours=2)))
    feed(ledger, [outcome("ghost", "deep", at=START),
                  decided("late", "deep", 0.9, at=START + timedelta(hours=3))])
    ledger.expire(NOW)
    assert ledger.unmatched_outcomes == 1
    assert list(ledger.pending) == ["late"]


def test_pending_requests_are_bounded():
    ledger = Ledger(Limits(max_pending=10))
    feed(ledger, [decided(f"r{i}", "deep", 0.9) for i in range(25)])
    ledger.expire(NOW)
    assert list(ledger.pending) == [f"r{i}" for i in range(15, 25)]


def test_figures_per_route_and_layer_equal_those_computed_from_the_events():
    rng = random.Random(5)
    ledger, events, truth = Ledger(), [], {}
    for i in range(600):
        rid, at = f"r{i}", START + timedelta(seconds=20 * i)
        if i % 7 == 0:
            event = ruled(rid, "deep", at=at)
        else:
            event = decided(rid, rng.choice(["lite", "deep"]), rng.uniform(0.3, 1.0), at=at,
                            latency_ms=rng.uniform(2, 40))
        events.append(event)
        if rng.random() < 0.6:
            truth[rid] = rng.choice(["lite", "deep"])
            events.append(outcome(rid, truth[rid], correct=truth[rid] == event.route_id,
                                  at=at + timedelta(hours=rng.uniform(0, 4))))
    rng.shuffle(events)
    feed(ledger, events)
    scores = ledger.scores(START + timedelta(hours=5), DAY)
    decisions = {e.request_id: e for e in events if type(e).__name__ == "RouteDecided"}
    for route_id in ("lite", "deep"):
        mine = [r for r, d in decisions.items() if d.route_id == route_id and r in truth]
        right = sum(truth[r] == route_id for r in mine)
        figures = route(scores, route_id)
        assert figures.outcomes == len(mine)
        assert figures.accuracy == pytest.approx(right / len(mine), abs=5e-4)
        assert figures.capture_rate == pytest.approx(
            sum(d.route_id == route_id for d in decisions.values()) / 600, abs=1e-6)
    rules = next(layer for layer in scores.layers if layer.layer == "rules")
    assert rules.capture_rate == pytest.approx(86 / 600, abs=1e-6)
    latencies = sorted(d.decision_latency_ms for d in decisions.values())
    assert scores.p95_decision_latency_ms == pytest.approx(latencies[569], rel=0.021)
    assert scores.low_confidence_rate == pytest.approx(
        sum(d.reason == "low_confidence" for d in decisions.values()) / 600, abs=1e-6)


def test_windows_cover_the_hours_they_say():
    ledger = Ledger()
    feed(ledger, [decided("old", "deep", 0.9, at=START - timedelta(hours=30)),
                  decided("new", "deep", 0.9, at=START)])
    assert ledger.scores(NOW, DAY).decisions == 1
    assert ledger.scores(NOW, timedelta(hours=168)).decisions == 2
    ledger.expire(START + timedelta(hours=721))
    assert ledger.buckets == {}


def test_the_snapshot_restores_every_figure_and_waiting_request():
    ledger = Ledger()
    feed(ledger, [decided("a", "deep", 0.55), observed("a", status=503),
                  decided("b", "deep", 0.9), outcome("a", "deep")])
    data = msgspec.msgpack.encode(ledger.snapshot())
    again = Ledger()
    again.restore(msgspec.msgpack.decode(data, type=Snapshot))
    assert again.scores(NOW, DAY).routes == ledger.scores(NOW, DAY).routes
    feed(again, [outcome("b", "lite")])
    assert route(again.scores(NOW, DAY), "deep").outcomes == 1
    assert route(again.scores(NOW, DAY), "lite").outcomes == 1
    assert again.candidates["a"].reasons == (
        "low_confidence", "upstream_non_2xx", "near_threshold", "wrong_route")


def test_advice_reaches_the_published_scores():
    ledger = Ledger()
    ledger.configure({"lite": 0.6, "deep": 0.6}, "lite", None)
    events = []
    for i in range(80):
        events += [decided(f"r{i}", "deep", 0.57), outcome(f"r{i}", "deep")]
    feed(ledger, events)
    made = ledger.scores(NOW, DAY, patch=lambda r, v: f"{r}->{v}").recommendations
    assert [(m.route_id, m.recommended_threshold, m.patch) for m in made] == [
        ("deep", 0.55, "deep->0.55")]
    assert route(ledger.scores(NOW, DAY), "deep").threshold_too_high == 80
