"""Synthetic observation and decision streams with known change points."""

import math
import random
from datetime import UTC, datetime, timedelta

from routemesh.services.drift_detector import DriftDecision, DriftObservation

START = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def healthy(rng: random.Random, i: int, *, model: str = "small-model", route: str = "lite",
            median_tokens: float = 200.0, sigma: float = 0.25, scale: float = 1.0,
            empty: float = 0.002, errors: float = 0.005, tools: float = 0.1,
            silent: float = 0.01, filtered: float = 0.001) -> DriftObservation:
    """One observation of a healthy model: lengths around a median with lognormal noise,
    rare errors, empty answers, unexpected stops and tool silence. ``scale`` multiplies
    the lengths (0.3: a collapse to 30 %)."""
    failed = rng.random() < errors
    offered = rng.random() < tools
    used = offered and rng.random() >= silent
    length = round(rng.lognormvariate(math.log(median_tokens), sigma))
    tokens = 0 if rng.random() < empty else max(1, math.floor(scale * length))
    finish = "content_filter" if rng.random() < filtered else "tool_calls" if used else "stop"
    return DriftObservation(
        route_id=route, target_model=model, occurred_at=START + timedelta(seconds=i),
        upstream_status=503 if failed else 200,
        completion_tokens=None if failed else tokens,
        finish_reason=None if failed else finish,
        tools_requested=offered, tools_used=used, ttft_ms=rng.uniform(80, 120),
    )


def decision(rng: random.Random, i: int, shares: dict[str, float], *,
             config: str = "c" * 64, score_shift: float = 0.0) -> DriftDecision:
    route = rng.choices(list(shares), weights=list(shares.values()))[0]
    return DriftDecision(
        route_id=route, reason="semantic", occurred_at=START + timedelta(seconds=i),
        score=min(1.0, max(0.0, rng.gauss(0.75 + score_shift, 0.08))),
        decision_latency_ms=rng.uniform(5, 9), config_sha256=config,
        route_bank_sha256="b" * 64,
    )
