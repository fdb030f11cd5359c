"""One percentile for the whole mesh: the nearest rank, the same from a list of values as
from counts of them (the scorer keeps latencies as binned counts)."""

import random

import pytest

from routemesh.services.runtime.stats import Percentiles, percentile, percentile_of_counts


def test_the_nearest_rank_is_a_value_that_occurred():
    values = [1.0, 2.0, 3.0, 4.0, 100.0]
    assert percentile(0.95, values) == 100.0, "ceil(0.95 * 5) = 5: the largest"
    assert percentile(0.5, values) == 3.0
    assert percentile(0.2, values) == 1.0
    assert percentile(0.5, []) is None
    assert Percentiles.of([]) == Percentiles()


@pytest.mark.parametrize("seed", range(5))
def test_a_list_and_its_counts_give_the_same_percentiles(seed):
    rng = random.Random(seed)
    values = [float(rng.randint(0, 40)) for _ in range(rng.randint(1, 300))]
    counts: dict[float, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    for q in (0.5, 0.95, 0.99, 1.0):
        assert percentile(q, values) == percentile_of_counts(q, counts)
    of = Percentiles.of(values)
    assert (of.p50, of.p95, of.p99) == tuple(percentile(q, values) for q in (0.5, 0.95, 0.99))
