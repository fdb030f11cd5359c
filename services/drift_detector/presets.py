"""Drift thresholds: three presets of sensitivity, one table each for answers (per target
model) and for routing (per route and overall)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import msgspec

Preset = Literal["low", "normal", "high"]


class ResponseThresholds(msgspec.Struct, frozen=True, kw_only=True):
    """A signal is flagged when it exceeds its threshold (length collapse: falls below)."""

    empty_response_rate: float
    length_collapse: float
    tool_silence_rate: float
    stop_anomaly_rate: float
    error_rate: float
    # Below this many observations in the window the verdict is insufficient_data.
    min_fill: int


class RoutingThresholds(msgspec.Struct, frozen=True, kw_only=True):
    low_confidence_rate: float
    embedding_error_rate: float
    # Population stability index of the route shares: the usual bands, 0.1 a moderate
    # and 0.25 a major shift; a preset moves where "mild" and "severe" start.
    route_share_psi_mild: float
    route_share_psi_severe: float
    # Two-sample Kolmogorov-Smirnov statistic of the top semantic score, flagged only
    # when its p-value is also below KS_ALPHA.
    score_ks: float
    latency_p95_ratio: float
    ttft_p95_ratio: float
    escalation_rate: float
    min_fill: int


KS_ALPHA = 0.01

RESPONSE: dict[str, ResponseThresholds] = {
    "low": ResponseThresholds(empty_response_rate=0.5, length_collapse=0.3,
                              tool_silence_rate=0.8, stop_anomaly_rate=0.6, error_rate=0.4,
                              min_fill=10),
    "normal": ResponseThresholds(empty_response_rate=0.3, length_collapse=0.5,
                                 tool_silence_rate=0.7, stop_anomaly_rate=0.4, error_rate=0.25,
                                 min_fill=6),
    "high": ResponseThresholds(empty_response_rate=0.2, length_collapse=0.7,
                               tool_silence_rate=0.5, stop_anomaly_rate=0.3, error_rate=0.15,
                               min_fill=4),
}

ROUTING: dict[str, RoutingThresholds] = {
    "low": RoutingThresholds(low_confidence_rate=0.5, embedding_error_rate=0.2,
                             route_share_psi_mild=0.25, route_share_psi_severe=0.5,
                             score_ks=0.4, latency_p95_ratio=3.0, ttft_p95_ratio=3.0,
                             escalation_rate=0.5, min_fill=100),
    "normal": RoutingThresholds(low_confidence_rate=0.3, embedding_error_rate=0.1,
                                route_share_psi_mild=0.1, route_share_psi_severe=0.25,
                                score_ks=0.3, latency_p95_ratio=2.0, ttft_p95_ratio=2.0,
                                escalation_rate=0.3, min_fill=50),
    "high": RoutingThresholds(low_confidence_rate=0.2, embedding_error_rate=0.05,
                              route_share_psi_mild=0.1, route_share_psi_severe=0.2,
                              score_ks=0.2, latency_p95_ratio=1.5, ttft_p95_ratio=1.5,
                              escalation_rate=0.2, min_fill=30),
}


# The thresholds a deployment may set one by one over its preset (the minimum fills stay
# the preset's: they are about the window, not a signal).
SIGNAL_THRESHOLDS = tuple(
    name for table in (ResponseThresholds, RoutingThresholds)
    for name in table.__struct_fields__ if name != "min_fill")


def thresholds(preset: Preset, overrides: Mapping[str, float] | None = None
               ) -> tuple[ResponseThresholds, RoutingThresholds]:
    """The preset's tables with the signals named in ``overrides`` set to their values;
    ValueError names a signal that is neither table's, or a value that is not positive."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(SIGNAL_THRESHOLDS))
    if unknown:
        raise ValueError(f"no such drift threshold: {', '.join(unknown)} (thresholds: "
                         f"{', '.join(SIGNAL_THRESHOLDS)})")
    wrong = sorted(name for name, value in overrides.items() if not value > 0)
    if wrong:
        raise ValueError(f"a drift threshold is a positive number: {', '.join(wrong)}")
    response, routing = RESPONSE[preset], ROUTING[preset]
    return (
        msgspec.structs.replace(response, **{k: float(v) for k, v in overrides.items()
                                             if k in ResponseThresholds.__struct_fields__}),
        msgspec.structs.replace(routing, **{k: float(v) for k, v in overrides.items()
                                            if k in RoutingThresholds.__struct_fields__}),
    )
