"""Percentiles and shares as every report of the mesh gives them.

One percentile definition for the whole mesh: the nearest rank (the smallest value with at
least ``q`` of the values at or below it), which is a value that occurred, reads the same
from a list and from counts of values (the scorer keeps latencies as counts in bins), and
needs no interpolation choice to be documented.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import msgspec

N = TypeVar("N", int, float)


def percentile(q: float, values: Sequence[float]) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q <= 1) of ``values``; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[max(math.ceil(q * len(ordered)), 1) - 1])


def percentile_of_counts(q: float, counts: Mapping[N, int]) -> N | None:
    """The nearest-rank ``q`` percentile of values given as value -> how many times."""
    total = sum(counts.values())
    if not total:
        return None
    rank, seen = max(math.ceil(q * total), 1), 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= rank:
            return value
    raise AssertionError("unreachable: the ranks add up to the total")


class Percentiles(msgspec.Struct, frozen=True, kw_only=True):
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        """Nearest-rank percentiles; all None for no values."""
        ordered = sorted(values)
        return cls(p50=percentile(0.50, ordered), p95=percentile(0.95, ordered),
                   p99=percentile(0.99, ordered))


def shares(values: Iterable[str]) -> dict[str, float]:
    """Each distinct value's share of ``values``, by value; empty for none."""
    counts = Counter(values)
    total = sum(counts.values())
    return {value: n / total for value, n in sorted(counts.items())}
