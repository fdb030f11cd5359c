from datetime import UTC, datetime

from routemesh.contracts import CompletionObserved, FormatSignals, LayerAttempt, RouteDecided

DAY = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def decision(request_id: str, when: datetime = DAY, **extra) -> RouteDecided:
    fields = dict(
        request_id=request_id, route_id="lite", target_model="small-model", reason="semantic",
        layer="semantic", score=0.7, decision_latency_ms=4.0, occurred_at=when,
        attempts=(LayerAttempt(layer="semantic", selected_route="lite", decided=True),),
        format=FormatSignals(message_count=1, input_chars=20), prompt_sha256="a" * 64,
    )
    fields.update(extra)
    return RouteDecided(**fields)


def observation(request_id: str, when: datetime = DAY, **extra) -> CompletionObserved:
    fields = dict(request_id=request_id, route_id="lite", target_model="small-model",
                  upstream_status=200, duration_ms=300.0, prompt_tokens=10,
                  completion_tokens=20, total_tokens=30, occurred_at=when)
    fields.update(extra)
    return CompletionObserved(**fields)
