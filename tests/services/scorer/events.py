"""Decisions, observations and outcomes as the gateway and callers publish them."""

from datetime import UTC, datetime, timedelta

from routemesh.contracts import (
    CompletionObserved,
    LayerAttempt,
    OutcomeReported,
    RouteDecided,
)

START = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
DEFAULT = "lite"


def decided(request_id: str, top: str, score: float, *, threshold: float = 0.6,
            margin: float = 0.3, required_margin: float = 0.05, at: datetime = START,
            second: str | None = None, latency_ms: float = 5.0, **extra) -> RouteDecided:
    """A semantic decision as the cascade makes it: accepted when the score reaches the
    threshold and the margin its minimum, else the default route as a fallback."""
    accepted = score >= threshold and margin >= required_margin
    route, layer = (top, "semantic") if accepted else (DEFAULT, "fallback")
    attempts = (LayerAttempt(layer="rules"),
                LayerAttempt(layer="semantic", selected_route=top, confidence=score,
                             threshold=threshold, decided=accepted))
    if not accepted:
        attempts += (LayerAttempt(layer="fallback", selected_route=DEFAULT, decided=True),)
    fields = dict(
        request_id=request_id, route_id=route, target_model=f"{route}-model",
        reason="semantic" if accepted else "low_confidence", layer=layer, score=score,
        second_route_id=second or ("deep" if top == "lite" else "lite"),
        margin=margin, threshold=threshold, required_margin=required_margin,
        attempts=attempts, decision_latency_ms=latency_ms, occurred_at=at,
        match_source="lite-deep/lite.txt" if accepted else None,
        match_index=3 if accepted else None,
        match_text_sha256=("a" * 64) if accepted else None,
    )
    fields.update(extra)
    return RouteDecided(**fields)


def ruled(request_id: str, route: str, at: datetime = START) -> RouteDecided:
    return RouteDecided(request_id=request_id, route_id=route, target_model=f"{route}-model",
                        reason="rule", layer="rules", score=1.0, occurred_at=at,
                        attempts=(LayerAttempt(layer="rules", selected_route=route,
                                               decided=True),))


def observed(request_id: str, route: str = DEFAULT, *, status: int = 200,
             duration_ms: float = 800.0, error: str | None = None,
             at: datetime = START) -> CompletionObserved:
    return CompletionObserved(request_id=request_id, route_id=route,
                              target_model=f"{route}-model", upstream_status=status,
                              duration_ms=duration_ms, error_class=error, occurred_at=at)


def outcome(request_id: str, expected: str | None = None, *, correct: bool | None = None,
            at: datetime = START + timedelta(hours=3), **extra) -> OutcomeReported:
    return OutcomeReported(request_id=request_id, expected_route=expected,
                           correct_route=correct, occurred_at=at, **extra)
