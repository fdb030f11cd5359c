"""Exponential backoff: the one schedule every retry loop of the mesh sleeps by."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays ``first``, ``first * factor``, ... never above ``most`` seconds."""

    first: float = 0.1
    most: float = 5.0
    factor: float = 2.0

    def delays(self) -> Iterator[float]:
        delay = self.first
        while True:
            yield delay
            delay = min(delay * self.factor, self.most)
