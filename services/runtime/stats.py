"""Percentiles and shares as every report of the mesh gives them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import msgspec
import numpy as np


class Percentiles(msgspec.Struct, frozen=True, kw_only=True):
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        """Linear-interpolated percentiles; all None for no values."""
        if not len(values):
            return cls()
        p50, p95, p99 = (float(v) for v in np.percentile(np.asarray(values), (50, 95, 99)))
        return cls(p50=p50, p95=p95, p99=p99)


def shares(values: Iterable[str]) -> dict[str, float]:
    """Each distinct value's share of ``values``, by value; empty for none."""
    counts = Counter(values)
    total = sum(counts.values())
    return {value: n / total for value, n in sorted(counts.items())}
