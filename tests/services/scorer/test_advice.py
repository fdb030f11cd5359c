import itertools
import random

import pytest

from routemesh.services.scorer import advice
from routemesh.services.scorer.advice import AdvicePolicy, advise, decode_key, move, sample_key


def table(samples):
    counts = {}
    for score, accepted, top, fallback in samples:
        key = sample_key(score, accepted, top, fallback)
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize(("score", "accepted", "top", "fallback"), list(itertools.product(
    (0.0, 0.37, 0.6, 1.0), (False, True), (None, False, True), (None, False, True))))
def test_sample_keys_round_trip(score, accepted, top, fallback):
    assert decode_key(sample_key(score, accepted, top, fallback)) == (
        round(score * 100), accepted, top, fallback)


def test_wilson_is_a_proper_interval():
    low, high = advice.wilson(45, 50)
    assert 0.77 < low < 0.9 < high < 0.97
    assert advice.wilson(0, 0) == (0.0, 1.0)


def test_a_move_counts_the_decisions_it_changes():
    # Scores 0.55-0.59 fell back; the top route was right for 8 of 10 of them.
    counts = table([(0.57, False, True, False)] * 8 + [(0.57, False, False, True)] * 2
                   + [(0.8, True, True, False)] * 40)
    m = move(counts, 0.60, 0.55)
    assert (m.gains, m.losses, m.unknown, m.samples) == (8, 2, 0, 50)
    assert (m.accepted_before, m.accepted_after) == (40, 50)
    assert advice.correct_at(counts, 0.55) - advice.correct_at(counts, 0.60) == m.net


def test_too_high_a_threshold_is_lowered_one_step_with_its_evidence():
    counts = table([(0.57, False, True, False)] * 20 + [(0.57, False, False, True)] * 2
                   + [(0.8, True, True, False)] * 40)
    made = advise("deep", 0.60, counts, AdvicePolicy(), decisions=200,
                  patch=lambda route, value: f"{route}:{value}")
    assert made.recommended_threshold == 0.55
    assert (made.below_threshold_but_right, made.above_threshold_but_wrong) == (20, 0)
    assert made.accuracy_change == pytest.approx(18 / 62, abs=1e-4)
    assert made.accuracy_change_low < made.accuracy_change < made.accuracy_change_high
    assert made.accuracy_change_low > 0
    assert made.fallback_rate_change == pytest.approx(-22 / 62, abs=1e-4)
    assert made.route_share_change == pytest.approx(22 / 200, abs=1e-4)
    assert made.patch == "deep:0.55"


def test_too_low_a_threshold_is_raised():
    counts = table([(0.62, True, False, True)] * 30 + [(0.9, True, True, False)] * 40)
    assert advise("deep", 0.60, counts, AdvicePolicy(), 100).recommended_threshold == 0.65


def test_aggressive_advice_moves_in_larger_steps():
    counts = table([(0.42, False, True, False)] * 30 + [(0.8, True, True, False)] * 40)
    # One step of 0.05 changes nothing these outcomes say; three of 0.10 reach them.
    assert advise("deep", 0.60, counts, AdvicePolicy(), 100).recommended_threshold == 0.60
    assert advise("deep", 0.60, counts, AdvicePolicy.of(aggressive=True),
                  100).recommended_threshold == 0.40


def test_no_advice_below_the_minimum_number_of_outcomes():
    counts = table([(0.57, False, True, False)] * 49)
    assert advise("deep", 0.60, counts, AdvicePolicy(), 100) is None
    assert advise("deep", 0.60, counts, AdvicePolicy(min_samples=40), 100) is not None


def test_noise_moves_no_threshold():
    """Outcomes that are right and wrong at random near the threshold are no evidence."""
    rng = random.Random(3)
    samples = []
    for _ in range(400):
        score = rng.uniform(0.5, 0.7)
        top = rng.random() < 0.5
        samples.append((score, score >= 0.6, top, not top))
    made = advise("deep", 0.60, table(samples), AdvicePolicy(), 400)
    assert made.recommended_threshold == 0.60
    assert made.rationale.startswith("keep 0.60")


def test_unknown_outcomes_are_not_evidence():
    counts = table([(0.57, False, True, None)] * 60)
    made = advise("deep", 0.60, counts, AdvicePolicy(), 100)
    assert made.recommended_threshold == 0.60
