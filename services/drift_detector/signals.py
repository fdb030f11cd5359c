"""Drift signals and verdicts: pure functions of windows of events. No Kafka, no files.

Answers drift per target model (``response_verdict``), routing drifts per route and
overall (``route_verdict``, ``overall_verdict``), each against thresholds of a preset.
The views hold only the fields read, built alike from events and from audit records.
"""

from __future__ import annotations

import statistics
from collections import Counter, deque
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Literal

import msgspec
import numpy as np

from routemesh.contracts import DriftSignal
from routemesh.services.drift_detector.presets import (
    KS_ALPHA,
    ResponseThresholds,
    RoutingThresholds,
)
from routemesh.services.runtime.stats import percentile

State = Literal["insufficient_data", "none", "mild", "severe"]
Severity = Literal["none", "mild", "severe"]
# The finish reasons an OpenAI-compatible upstream gives a healthy answer.
EXPECTED_FINISH = frozenset({"stop", "tool_calls", "length"})


# The views hold scalars and tuples of strings, never a cycle: untracked by the garbage
# collector (gc=False), the thousands a detector keeps in its windows cost no GC passes.
class DriftObservation(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The fields of a CompletionObserved (or an audit record's observation) drift reads."""

    route_id: str
    target_model: str
    occurred_at: datetime
    upstream_status: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    tools_requested: bool = False
    tools_used: bool = False
    stream: bool = False
    error_class: str | None = None
    ttft_ms: float | None = None
    escalation_path: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        status = self.upstream_status
        return self.error_class is not None or status is None or not 200 <= status < 300


class DriftCall(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The fields of one upstream call (CompletionObserved 1.2 ``calls``, or an audit
    record's) drift reads: what a model did, served or not."""

    model: str
    route_id: str | None = None
    upstream_status: int | None = None
    error_class: str | None = None
    served: bool = False
    completion_tokens: int | None = None
    finish_reason: str | None = None
    tools_used: bool = False


class _Calls(msgspec.Struct, frozen=True, kw_only=True):
    calls: tuple[DriftCall, ...] = ()


def unserved_attempts(source: object, served: DriftObservation) -> list[DriftObservation]:
    """The calls of an observation (an event or an audit record's) whose answer was not
    served, each as an observation of the model that made it: a model's empty answer or
    error counts against it even when a failover or an escalation answered instead."""
    calls = msgspec.convert(source, _Calls, from_attributes=True).calls
    return [DriftObservation(route_id=call.route_id or served.route_id, target_model=call.model,
                             occurred_at=served.occurred_at,
                             upstream_status=call.upstream_status,
                             completion_tokens=call.completion_tokens,
                             finish_reason=call.finish_reason,
                             tools_requested=served.tools_requested,
                             tools_used=call.tools_used, error_class=call.error_class)
            for call in calls if not call.served]


class DriftDecision(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The fields of a RouteDecided (or an audit record's decision) drift reads."""

    route_id: str
    reason: str
    occurred_at: datetime
    score: float | None = None
    decision_latency_ms: float = 0.0
    config_sha256: str | None = None
    route_bank_sha256: str | None = None


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    state: State
    signals: tuple[DriftSignal, ...]
    reason: str
    samples: int


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


def _reaches(name: str, value: float | None, threshold: float, severity: Severity) -> DriftSignal:
    # Reaching the threshold flags: "30 % empty answers" is flagged at a 0.3 threshold.
    flagged = value is not None and round(value, 3) >= threshold
    return DriftSignal(name=name, value=_round(value), threshold=threshold, flagged=flagged,
                  severity=severity if flagged else "none")


def _state(flagged: list[Severity], enough: bool) -> State:
    """Severe if a severe signal is flagged or two mild ones are."""
    if not enough:
        return "insufficient_data"
    if "severe" in flagged or len(flagged) >= 2:
        return "severe"
    return "mild" if flagged else "none"


def _judge(signals: list[DriftSignal], samples: int, enough: bool) -> Verdict:
    """The verdict on judged signals, with the reason in words."""
    flagged = [s for s in signals if s.flagged]
    state = _state([s.severity for s in flagged], enough)
    if not enough:
        reason = f"{samples} samples, too few to judge"
    elif flagged:
        reason = "; ".join(
            f"{s.name} {s.value} {'at or below' if s.name == 'length_collapse' else 'at or above'} "
            f"{s.threshold}" for s in flagged)
    else:
        reason = "every signal within its threshold"
    return Verdict(state=state, signals=tuple(signals), reason=reason, samples=samples)


# A target model's signals and the severity of each when flagged.
RESPONSE_SIGNALS: tuple[tuple[str, Severity], ...] = (
    ("empty_response_rate", "severe"),
    ("length_collapse", "severe"),
    ("tool_silence_rate", "mild"),
    ("stop_anomaly_rate", "mild"),
    ("error_rate", "mild"),
)
_SEVERITIES = tuple(severity for _, severity in RESPONSE_SIGNALS)
_FALLS = tuple(name == "length_collapse" for name, _ in RESPONSE_SIGNALS)


class ResponseWindow:
    """A target model's last ``size`` observations (and, with ``max_age``, none older
    than that behind the newest), with the counts its signals need kept as observations
    come and go: a model is judged after each observation, and recounting the window
    each time cost more than everything else the detector does per event."""

    def __init__(self, size: int, expected_finish: frozenset[str] = EXPECTED_FINISH,
                 max_age: timedelta | None = None) -> None:
        self.size = size
        self.expected_finish = expected_finish
        self.max_age = max_age
        self.items: deque[DriftObservation] = deque()
        # Whether each item failed, in the same order (asked once per item, not per count).
        self._failed: deque[bool] = deque()
        # Lengths of the answered observations whose length is known, in order.
        self.lengths: deque[int] = deque()
        self.failed = self.empty = self.offered = self.silent = self.anomalous = 0

    @classmethod
    def of(cls, observations: Sequence[DriftObservation],
           expected_finish: frozenset[str] = EXPECTED_FINISH) -> ResponseWindow:
        window = cls(max(len(observations), 1), expected_finish)
        for view in observations:
            window.add(view)
        return window

    def __len__(self) -> int:
        return len(self.items)

    def _count(self, view: DriftObservation, failed: bool, step: int) -> None:
        if failed:
            self.failed += step
            return
        # A stream without usage says nothing about its length: unknown, never empty.
        if view.completion_tokens is not None:
            self.empty += step * (view.completion_tokens == 0)
        if view.tools_requested:
            self.offered += step
            self.silent += step * (not view.tools_used)
        self.anomalous += step * (view.finish_reason not in self.expected_finish)

    def add(self, view: DriftObservation) -> None:
        failed = view.failed
        self.items.append(view)
        self._failed.append(failed)
        self._count(view, failed, 1)
        if not failed and view.completion_tokens is not None:
            self.lengths.append(view.completion_tokens)
        while len(self.items) > self.size or (
            self.max_age is not None
            and view.occurred_at - self.items[0].occurred_at > self.max_age
        ):
            self._drop()

    def _drop(self) -> None:
        gone, failed = self.items.popleft(), self._failed.popleft()
        self._count(gone, failed, -1)
        if not failed and gone.completion_tokens is not None:
            self.lengths.popleft()

    def clear(self) -> None:
        while self.items:
            self._drop()

    def values(self) -> tuple[float | None, ...]:
        """The signals' values, in RESPONSE_SIGNALS order (None: not enough to say)."""
        total, lengths = len(self.items), self.lengths
        answered = total - self.failed
        collapse = None
        if len(lengths) >= 4:
            ordered = list(lengths)
            half = len(ordered) // 2
            earlier_median = statistics.median(ordered[:half])
            if earlier_median > 0:
                collapse = statistics.median(ordered[half:]) / earlier_median
        return (
            self.empty / len(lengths) if lengths else None,
            collapse,
            self.silent / self.offered if self.offered >= 3 else None,
            self.anomalous / answered if answered else None,
            self.failed / total if total else None,
        )

    @staticmethod
    def _flags(values: tuple[float | None, ...],
               thresholds: ResponseThresholds) -> list[bool]:
        # Reaching the threshold flags (length collapse: falling to it), so "30 % empty
        # answers" is flagged at 0.3 and "a collapse to 30 %" at 0.3.
        return [value is not None and (round(value, 3) <= threshold if falls
                                       else round(value, 3) >= threshold)
                for value, threshold, falls in zip(
                    values, _response_thresholds(thresholds), _FALLS, strict=True)]

    def state(self, thresholds: ResponseThresholds) -> State:
        """The verdict's state alone: what the detector needs after most observations."""
        flags = self._flags(self.values(), thresholds)
        return _state([severity for severity, flag in zip(_SEVERITIES, flags, strict=True)
                       if flag], len(self.items) >= thresholds.min_fill)

    def verdict(self, thresholds: ResponseThresholds) -> Verdict:
        """The model's answers: empty, collapsing in length, silent on tools, stopping
        oddly, failing."""
        values = self.values()
        flags = self._flags(values, thresholds)
        signals = [
            DriftSignal(name=name, value=_round(value), threshold=threshold, flagged=flag,
                        severity=severity if flag else "none")
            for (name, severity), value, threshold, flag in zip(
                RESPONSE_SIGNALS, values, _response_thresholds(thresholds), flags, strict=True)
        ]
        total = len(self.items)
        return _judge(signals, total, total >= thresholds.min_fill)


def _response_thresholds(thresholds: ResponseThresholds) -> tuple[float, ...]:
    return (thresholds.empty_response_rate, thresholds.length_collapse,
            thresholds.tool_silence_rate, thresholds.stop_anomaly_rate, thresholds.error_rate)


def response_verdict(
    window: Sequence[DriftObservation],
    thresholds: ResponseThresholds,
    expected_finish: frozenset[str] = EXPECTED_FINISH,
) -> Verdict:
    """The verdict on a window of one model's observations, oldest first."""
    return ResponseWindow.of(window, expected_finish).verdict(thresholds)


def population_stability_index(current: Counter[str], baseline: Counter[str]) -> float:
    """PSI of two categorical distributions (route shares), smoothed so a route absent on
    one side does not make it infinite. Chosen over Jensen-Shannon divergence for its
    conventional bands (0.1 moderate, 0.25 major), which operators already read."""
    names = sorted(set(current) | set(baseline))
    n_current, n_baseline = sum(current.values()), sum(baseline.values())
    epsilon = 1e-4
    psi = 0.0
    for name in names:
        p = max(current[name] / n_current, epsilon)
        q = max(baseline[name] / n_baseline, epsilon)
        psi += (p - q) * np.log(p / q)
    return float(psi)


def ks_statistic(current: Sequence[float], baseline: Sequence[float]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two
    empirical distribution functions."""
    a, b = np.sort(current), np.sort(baseline)
    both = np.concatenate([a, b])
    gap = (np.searchsorted(a, both, side="right") / len(a)
           - np.searchsorted(b, both, side="right") / len(b))
    return float(np.max(np.abs(gap)))


def _ks(current: Sequence[float], baseline: Sequence[float], threshold: float,
        name: str) -> DriftSignal:
    """The KS statistic of the top scores, flagged only when it exceeds the threshold and
    the shift is significant. The statistic is computed here because the routing verdicts
    are judged often and scipy's test carries a fixed overhead far above it; scipy gives
    the p-value, needed only once the statistic is over the threshold."""
    if len(current) < 20 or len(baseline) < 20:
        return DriftSignal(name=name, value=None, threshold=threshold)
    statistic = ks_statistic(current, baseline)
    flagged = False
    if statistic > threshold:
        from scipy.stats import ks_2samp

        flagged = bool(ks_2samp(current, baseline).pvalue < KS_ALPHA)
    return DriftSignal(name=name, value=_round(statistic), threshold=threshold,
                       flagged=flagged, severity="mild" if flagged else "none")


def _p95(values: Sequence[float]) -> float | None:
    """The mesh's p95, of at least ten values (fewer say nothing of a tail)."""
    return percentile(0.95, values) if len(values) >= 10 else None


def _ratio(current: Sequence[float], baseline: Sequence[float]) -> float | None:
    now, before = _p95(current), _p95(baseline)
    return now / before if now is not None and before else None


def _decisions_against_baseline(
    window: Sequence[DriftDecision], baseline: Sequence[DriftDecision],
    thresholds: RoutingThresholds,
) -> list[DriftSignal]:
    """The top scores' distribution and the decision latency p95, each against the
    baseline (unknown while the baseline holds less than the minimum fill)."""
    comparable = len(baseline) >= thresholds.min_fill
    return [
        _ks([d.score for d in window if d.score is not None],
            [d.score for d in baseline if d.score is not None] if comparable else [],
            thresholds.score_ks, "score_ks"),
        _reaches("decision_latency_p95_ratio",
                 _ratio([d.decision_latency_ms for d in window],
                        [d.decision_latency_ms for d in baseline]) if comparable else None,
                 thresholds.latency_p95_ratio, "mild"),
    ]


def overall_verdict(
    window: Sequence[DriftDecision], baseline: Sequence[DriftDecision],
    thresholds: RoutingThresholds,
) -> Verdict:
    """All routing: fallbacks, the route mix, the top scores and decision latency against
    the baseline window."""
    n = len(window)
    low = sum(1 for d in window if d.reason == "low_confidence") / n if n else None
    broken = sum(1 for d in window if d.reason == "embedding_error") / n if n else None
    comparable = len(baseline) >= thresholds.min_fill
    psi = (population_stability_index(Counter(d.route_id for d in window),
                                       Counter(d.route_id for d in baseline))
           if comparable and n else None)
    severe_shift = psi is not None and round(psi, 3) >= thresholds.route_share_psi_severe
    psi_severity: Severity = "severe" if severe_shift else "mild"
    signals = [
        _reaches("low_confidence_rate", low, thresholds.low_confidence_rate, "mild"),
        _reaches("embedding_error_rate", broken, thresholds.embedding_error_rate, "severe"),
        _reaches("route_share_psi", psi, thresholds.route_share_psi_mild, psi_severity),
        *_decisions_against_baseline(window, baseline, thresholds),
    ]
    return _judge(signals, n, n >= thresholds.min_fill)


def route_verdict(
    decisions: Sequence[DriftDecision], baseline: Sequence[DriftDecision],
    observations: Sequence[DriftObservation], observations_baseline: Sequence[DriftObservation],
    thresholds: RoutingThresholds,
) -> Verdict:
    """One route: its top scores, its decision latency, its upstream's time to first
    token against the baseline, and how often its answers escalate."""
    ttft = [o.ttft_ms for o in observations if o.ttft_ms is not None]
    ttft_before = [o.ttft_ms for o in observations_baseline if o.ttft_ms is not None]
    escalated = (sum(1 for o in observations if len(o.escalation_path) > 1) / len(observations)
                 if observations else None)
    signals = [
        *_decisions_against_baseline(decisions, baseline, thresholds),
        _reaches("ttft_p95_ratio", _ratio(ttft, ttft_before), thresholds.ttft_p95_ratio, "mild"),
        _reaches("escalation_rate", escalated, thresholds.escalation_rate, "mild"),
    ]
    return _judge(signals, len(decisions), len(decisions) >= thresholds.min_fill)
