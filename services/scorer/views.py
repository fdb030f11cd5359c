"""The fields of each event the scorer reads, and what a decision and its outcome say
about the threshold that made it. Pure: the service, `routemesh review` and
`routemesh tune` all judge with these. The views are saved with the scorer's state as
arrays (no field names), which keeps a waiting request small."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from routemesh.contracts import CompletionObserved, FormatSignals, OutcomeReported, RouteDecided


class LedgerAttempt(msgspec.Struct, frozen=True, kw_only=True, gc=False, array_like=True):
    layer: str
    selected_route: str | None = None
    confidence: float | None = None
    threshold: float | None = None
    decided: bool = False
    error: str | None = None


class LedgerDecision(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    request_id: str
    occurred_at: datetime
    route_id: str
    reason: str
    layer: str
    score: float | None = None
    second_route_id: str | None = None
    margin: float | None = None
    threshold: float | None = None
    required_margin: float | None = None
    attempts: tuple[LedgerAttempt, ...] = ()
    decision_latency_ms: float = 0.0
    match_source: str | None = None
    match_index: int | None = None
    match_text_sha256: str | None = None
    # What a review candidate shows a reviewer (appended: a saved state's older, shorter
    # rows still decode).
    target_model: str | None = None
    second_score: float | None = None
    config_source: str | None = None
    config_sha256: str | None = None
    route_bank_sha256: str | None = None
    format: FormatSignals | None = None


class LedgerObservation(msgspec.Struct, frozen=True, kw_only=True, gc=False, array_like=True):
    request_id: str
    upstream_status: int | None = None
    duration_ms: float = 0.0
    error_class: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class LedgerOutcome(msgspec.Struct, frozen=True, kw_only=True, gc=False, array_like=True):
    request_id: str
    occurred_at: datetime
    correct_route: bool | None = None
    expected_route: str | None = None
    quality_score: float | None = None
    completion_time_s: float | None = None


def view(event: RouteDecided | CompletionObserved | OutcomeReported) -> Any:
    kind = (LedgerDecision if isinstance(event, RouteDecided)
            else LedgerObservation if isinstance(event, CompletionObserved) else LedgerOutcome)
    return msgspec.convert(event, kind, from_attributes=True)


class Semantic(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What the semantic layer made of a request: its top route and score against that
    route's threshold. ``movable`` says whether moving the threshold could change the
    decision (a fallback above the threshold was stopped by the margin or the evidence
    floor, which a threshold does not move)."""

    top_route: str
    score: float
    threshold: float
    accepted: bool
    movable: bool


def semantic_of(decision: LedgerDecision) -> Semantic | None:
    for attempt in decision.attempts:
        if attempt.layer != "semantic" or attempt.error is not None:
            continue
        if attempt.selected_route is None or attempt.confidence is None \
                or attempt.threshold is None:
            return None
        margin_ok = (decision.margin is None or decision.required_margin is None
                     or decision.margin >= decision.required_margin)
        below = attempt.confidence < attempt.threshold
        return Semantic(top_route=attempt.selected_route, score=attempt.confidence,
                        threshold=attempt.threshold, accepted=attempt.decided,
                        movable=attempt.decided or (below and margin_ok))
    return None


def final_right(decision: LedgerDecision, outcome: LedgerOutcome) -> bool | None:
    """Whether the route served was right, as the outcome says (None: it does not)."""
    if outcome.correct_route is not None:
        return outcome.correct_route
    if outcome.expected_route is not None:
        return outcome.expected_route == decision.route_id
    return None


def top_right(decision: LedgerDecision, semantic: Semantic, outcome: LedgerOutcome) -> bool | None:
    """Whether the semantic layer's top route was right, whether or not it was served."""
    if outcome.expected_route is not None:
        return outcome.expected_route == semantic.top_route
    served = final_right(decision, outcome)
    if decision.route_id == semantic.top_route:
        return served
    # Another route (the fallback) was served: if it was right, the top route was not.
    return False if served else None


def fallback_right(decision: LedgerDecision, semantic: Semantic, outcome: LedgerOutcome,
                   default_route: str | None) -> bool | None:
    """Whether the fallback route would have been (or was) right."""
    if not semantic.accepted:
        return final_right(decision, outcome)
    if outcome.expected_route is not None and default_route is not None:
        return outcome.expected_route == default_route
    if default_route == semantic.top_route:
        return final_right(decision, outcome)
    return False if final_right(decision, outcome) else None


def feedback(decision: LedgerDecision, outcome: LedgerOutcome) -> tuple[str, ...]:
    """The learning feedback classes of one outcome."""
    classes = []
    if final_right(decision, outcome):
        classes.append("correct_routing")
    semantic = semantic_of(decision)
    if semantic is not None and semantic.movable:
        right = top_right(decision, semantic, outcome)
        if not semantic.accepted and right:
            classes.append("threshold_too_high")
        if semantic.accepted and right is False:
            classes.append("threshold_too_low")
    return tuple(classes)
