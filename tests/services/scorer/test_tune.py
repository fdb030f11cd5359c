"""The pure parts of `routemesh tune`: the split, thresholds fitted per route with the
evidence floor, the cost search, and what is safe to apply."""

from routemesh.services.router import RouteRequest
from routemesh.services.router.datasets import EvalItem
from routemesh.services.scorer.tune import (
    Case,
    Prices,
    Setting,
    cheapen,
    fit_thresholds,
    measure,
    split,
)

DEFAULT = "lite"


def deep_cases(n: int) -> list[Case]:
    """Items topped by deep at 0.7 that really are deep: a threshold of 0.8 loses them."""
    return [Case(f"d{i}", "deep", None, "deep", 0.7, 0.5, input_tokens=100) for i in range(n)]


def test_a_threshold_too_high_is_fitted_back():
    fitted = fit_thresholds(deep_cases(20), {"lite": 0.6, "deep": 0.8}, 0.05, DEFAULT, False)
    assert fitted == {"lite": 0.6, "deep": 0.7}


def test_a_route_with_too_little_evidence_keeps_its_threshold():
    current = {"lite": 0.6, "deep": 0.8}
    assert fit_thresholds(deep_cases(5), current, 0.05, DEFAULT, False, min_samples=10) == \
        current
    assert fit_thresholds(deep_cases(10), current, 0.05, DEFAULT, False,
                          min_samples=10)["deep"] == 0.7


def test_a_normal_tune_stays_within_reach_and_an_aggressive_one_does_not():
    low = [Case(f"d{i}", "deep", None, "deep", 0.2, 0.5) for i in range(20)]
    assert fit_thresholds(low, {"lite": 0.6, "deep": 0.6}, 0.05, DEFAULT, False)["deep"] == 0.6
    assert fit_thresholds(low, {"lite": 0.6, "deep": 0.6}, 0.05, DEFAULT, True)["deep"] == 0.2


def test_the_cost_search_keeps_accuracy_at_the_minimum():
    # Deep tops lite items at 0.65 and deep items at 0.8: from 0.6, the next step (0.65)
    # moves nothing; 0.7 sends the lite items to lite, right and cheaper.
    cases = [Case(f"d{i}", "deep", None, "deep", 0.8, 0.5, input_tokens=100) for i in range(10)]
    cases += [Case(f"l{i}", "lite", None, "deep", 0.65, 0.5, input_tokens=100) for i in range(10)]
    prices = Prices({"lite": (0.1, 0.0), "deep": (1.0, 0.0)}, 0.0)
    start = Setting({"lite": 0.6, "deep": 0.6}, 0.05)
    assert measure(cases, start, DEFAULT, prices).accuracy == 0.5
    cheaper = cheapen(cases, start, start.thresholds, DEFAULT, prices, 0.9, False)
    figures = measure(cases, cheaper, DEFAULT, prices)
    assert figures.accuracy == 1.0
    assert figures.cost < measure(cases, start, DEFAULT, prices).cost
    # With a lower bar, everything to the cheap route is cheaper still, and half wrong.
    cheapest = cheapen(cases, start, start.thresholds, DEFAULT, prices, 0.5, False)
    assert measure(cases, cheapest, DEFAULT, prices).accuracy == 0.5
    assert measure(cases, cheapest, DEFAULT, prices).cost < figures.cost


def test_the_split_depends_on_ids_not_order():
    items = [EvalItem(f"id-{i}", RouteRequest.from_text("x"), "lite") for i in range(200)]
    train, held = split(items)
    again_train, again_held = split(list(reversed(items)))
    assert {i.id for i in train} == {i.id for i in again_train}
    assert {i.id for i in held} == {i.id for i in again_held}
    assert 60 < len(held) < 140
