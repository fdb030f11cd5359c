"""Threshold advice from outcomes: what each route's threshold would have done to the
outcomes seen had it been higher or lower, and whether the evidence says to move it.

A route's evidence is a table of counts keyed by ``sample_key``: the semantic score in
hundredths, whether the decision was accepted, and whether the top route and the
fallback were right (each true, false or unknown). Counts keep the scorer's state
bounded however much traffic it sees, and a threshold on the 0.01 grid splits them
exactly as it would have split the scores.

A move is judged on the decisions it would change: those between the old and the new
threshold whose outcome says which side was right. It is recommended when it makes more
of them right than wrong and the 95 % Wilson interval of that share stays above one half
(a sign test): chance alone rarely moves a threshold.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from routemesh.contracts import ThresholdRecommendation

RESOLUTION = 100
Z95 = 1.959964
_TRI = {None: 0, False: 1, True: 2}
_FROM_TRI = (None, False, True)


def sample_key(score: float, accepted: bool, top: bool | None, fallback: bool | None) -> int:
    score_bin = min(RESOLUTION, max(0, math.floor(score * RESOLUTION + 1e-9)))
    return ((score_bin * 2 + accepted) * 3 + _TRI[top]) * 3 + _TRI[fallback]


def decode_key(key: int) -> tuple[int, bool, bool | None, bool | None]:
    rest, fallback = divmod(key, 3)
    rest, top = divmod(rest, 3)
    score_bin, accepted = divmod(rest, 2)
    return score_bin, bool(accepted), _FROM_TRI[top], _FROM_TRI[fallback]


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _bin(threshold: float) -> int:
    return round(threshold * RESOLUTION)


@dataclass(frozen=True)
class Move:
    """What moving a threshold from ``old`` to ``new`` would have done."""

    old: float
    new: float
    samples: int
    gains: int
    losses: int
    # Changed decisions whose outcome does not say which side was right.
    unknown: int
    accepted_before: int
    accepted_after: int

    @property
    def changed(self) -> int:
        return self.gains + self.losses

    @property
    def net(self) -> int:
        return self.gains - self.losses


def correct_at(counts: Mapping[int, int], threshold: float) -> int:
    """Decisions the outcomes say would have been right with this threshold."""
    cut = _bin(threshold)
    right = 0
    for key, count in counts.items():
        score_bin, _, top, fallback = decode_key(key)
        if (top if score_bin >= cut else fallback):
            right += count
    return right


def move(counts: Mapping[int, int], old: float, new: float) -> Move:
    old_cut, new_cut = _bin(old), _bin(new)
    low, high = min(old_cut, new_cut), max(old_cut, new_cut)
    samples = gains = losses = unknown = before = after = 0
    for key, count in counts.items():
        score_bin, _, top, fallback = decode_key(key)
        samples += count
        before += count * (score_bin >= old_cut)
        after += count * (score_bin >= new_cut)
        if not low <= score_bin < high:
            continue
        was, now = (top, fallback) if score_bin >= old_cut else (fallback, top)
        if was is None or now is None:
            unknown += count
        elif now and not was:
            gains += count
        elif was and not now:
            losses += count
    return Move(old, new, samples, gains, losses, unknown, before, after)


@dataclass(frozen=True)
class AdvicePolicy:
    step: float = 0.05
    # Steps one piece of advice may move a threshold: live advice moves one step at a
    # time, so each move is seen working before the next.
    max_steps: int = 1
    min_samples: int = 50
    lowest: float = 0.05
    highest: float = 0.95

    @classmethod
    def of(cls, aggressive: bool, min_samples: int = 50) -> AdvicePolicy:
        return cls(step=0.10 if aggressive else 0.05, max_steps=3 if aggressive else 1,
                   min_samples=min_samples)

    def candidates(self, current: float) -> list[float]:
        found = []
        for k in range(1, self.max_steps + 1):
            for sign in (-1, 1):
                value = round(current + sign * k * self.step, 2)
                if self.lowest - 1e-9 <= value <= self.highest + 1e-9:
                    found.append(value)
        return found


def significant(m: Move) -> bool:
    return m.net > 0 and wilson(m.gains, m.changed)[0] > 0.5


def best_move(counts: Mapping[int, int], current: float, candidates: list[float],
              accept: Callable[[Move], bool] = significant) -> Move:
    """The candidate that makes the most decisions right (the smaller move on a tie), or
    no move when none passes ``accept``."""
    best = move(counts, current, current)
    for candidate in sorted(candidates, key=lambda c: abs(c - current)):
        m = move(counts, current, candidate)
        if accept(m) and m.net > best.net:
            best = m
    return best


def advise(route_id: str, current: float, counts: Mapping[int, int], policy: AdvicePolicy,
           decisions: int, patch: Callable[[str, float], str] | None = None,
           ) -> ThresholdRecommendation | None:
    """Advice for one route; None below the minimum number of outcomes."""
    samples = sum(counts.values())
    if samples < policy.min_samples:
        return None
    below_right = above_wrong = 0
    for key, count in counts.items():
        _, accepted, top, _ = decode_key(key)
        below_right += count * (not accepted and top is True)
        above_wrong += count * (accepted and top is False)
    chosen = best_move(counts, current, policy.candidates(current))
    evidence = (f"of {samples} outcomes, {below_right} fell back below {current:.2f} with "
                f"the top route right and {above_wrong} were accepted and wrong")
    if chosen.new == current:
        return ThresholdRecommendation(
            route_id=route_id, current_threshold=current, recommended_threshold=current,
            below_threshold_but_right=below_right, above_threshold_but_wrong=above_wrong,
            samples=samples, accuracy_change=0.0, fallback_rate_change=0.0,
            route_share_change=0.0,
            rationale=f"keep {current:.2f}: {evidence}; no move of up to "
                      f"{policy.max_steps} x {policy.step:.2f} is clearly better")
    low, high = wilson(chosen.gains, chosen.changed)
    scale = chosen.changed / samples
    return ThresholdRecommendation(
        route_id=route_id, current_threshold=current, recommended_threshold=chosen.new,
        below_threshold_but_right=below_right, above_threshold_but_wrong=above_wrong,
        samples=samples,
        accuracy_change=round(chosen.net / samples, 4),
        accuracy_change_low=round((2 * low - 1) * scale, 4),
        accuracy_change_high=round((2 * high - 1) * scale, 4),
        fallback_rate_change=round((chosen.accepted_before - chosen.accepted_after) / samples, 4),
        route_share_change=round((chosen.accepted_after - chosen.accepted_before)
                                 / max(decisions, 1), 4),
        rationale=f"{'lower' if chosen.new < current else 'raise'} to {chosen.new:.2f}: "
                  f"{evidence}; the move would have made {chosen.gains} right and "
                  f"{chosen.losses} wrong of the {chosen.changed + chosen.unknown} it changes",
        patch=patch(route_id, chosen.new) if patch else "",
    )


def merge(tables: list[Mapping[int, int]]) -> Counter[int]:
    total: Counter[int] = Counter()
    for table in tables:
        total.update(table)
    return total
