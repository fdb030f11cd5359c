"""Audit records: one per request, typed, built from an explicit allow-list of fields.

The structs below are the allow-list and the privacy firewall: a record is built by
reading only the fields they declare from the events (``from_attributes``), so a field
added to an event later never reaches the audit trail until someone adds it here, on
purpose; and a line read back with a field they do not declare is refused
(``forbid_unknown_fields``), which is what ``routemesh audit verify`` checks.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

import msgspec

from routemesh.contracts import CompletionObserved, OutcomeReported, RouteDecided
from routemesh.contracts.events import (
    Count,
    DecisionLayer,
    DecisionReason,
    NonNegative,
    RequestId,
    RouteId,
    Sha256Hex,
    UtcDatetime,
    utc_now,
)
from routemesh.services.runtime.files import unreadable

RECORD_VERSION = 1
Join = Literal["joined", "decision_only", "observation_only", "amendment", "outcome"]


class _Allowed(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class AuditAttempt(_Allowed, frozen=True, kw_only=True):
    layer: DecisionLayer
    selected_route: RouteId | None = None
    confidence: float | None = None
    threshold: float | None = None
    latency_ms: NonNegative = 0.0
    decided: bool = False
    error: str | None = None


class AuditFormat(_Allowed, frozen=True, kw_only=True):
    tools_present: bool = False
    tool_history: bool = False
    tool_choice: str | None = None
    message_count: Count = 0
    input_chars: Count = 0
    response_format: str | None = None
    match_text_cut: bool = False


class AuditDecision(_Allowed, frozen=True, kw_only=True):
    schema_version: str
    occurred_at: UtcDatetime
    route_id: RouteId
    target_model: str
    reason: DecisionReason
    layer: DecisionLayer
    score: float | None = None
    second_route_id: RouteId | None = None
    second_score: float | None = None
    margin: float | None = None
    threshold: float | None = None
    required_margin: float | None = None
    attempts: tuple[AuditAttempt, ...] = ()
    decision_latency_ms: NonNegative = 0.0
    config_source: str = ""
    config_sha256: Sha256Hex | None = None
    route_bank_sha256: Sha256Hex | None = None
    match_source: str | None = None
    match_index: int | None = None
    match_text_sha256: Sha256Hex | None = None
    match_score: float | None = None
    match_provenance: str | None = None
    prompt_sha256: Sha256Hex | None = None
    prompt_chars: Count = 0
    format: AuditFormat = AuditFormat()
    requested_model: str | None = None
    gateway_instance: str = ""
    # The client's own x-request-id (a correlation field; request_id is the mesh's).
    client_request_id: str | None = None


class AuditCall(_Allowed, frozen=True, kw_only=True):
    model: str
    route_id: RouteId | None = None
    upstream_status: int | None = None
    error_class: str | None = None
    duration_ms: NonNegative = 0.0
    served: bool = False
    completion_tokens: Count | None = None
    finish_reason: str | None = None
    tools_used: bool = False
    failed_gates: tuple[str, ...] = ()


class AuditObservation(_Allowed, frozen=True, kw_only=True):
    schema_version: str
    occurred_at: UtcDatetime
    route_id: RouteId
    target_model: str
    upstream_status: int | None = None
    duration_ms: NonNegative = 0.0
    ttft_ms: NonNegative | None = None
    prompt_tokens: Count | None = None
    completion_tokens: Count | None = None
    total_tokens: Count | None = None
    finish_reason: str | None = None
    tools_requested: bool = False
    tools_used: bool = False
    stream: bool = False
    error_class: str | None = None
    escalation_path: tuple[str, ...] = ()
    escalation_reason: str | None = None
    escalation_gates: tuple[str, ...] = ()
    escalation_recovered: bool | None = None
    calls: tuple[AuditCall, ...] = ()
    failover_reason: str | None = None


class AuditOutcome(_Allowed, frozen=True, kw_only=True):
    """What the caller learned about a request, as metadata: never its labels or source,
    which are the caller's free words."""

    schema_version: str
    occurred_at: UtcDatetime
    completed: bool | None = None
    correct_route: bool | None = None
    expected_route: RouteId | None = None
    quality_score: float | None = None
    completion_time_s: NonNegative | None = None


class AuditRecord(_Allowed, frozen=True, kw_only=True):
    """One line of ``AUDIT_DIR/<day>.jsonl``."""

    record_version: int = RECORD_VERSION
    request_id: RequestId
    # The UTC day of the file the record is in: of the decision (of the observation when
    # there is none).
    day: Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d{2}-\d{2}$")]
    join: Join
    # The first event id of the record this one completes (join "amendment", and
    # "outcome" when the request's record was written before it).
    amends: str | None = None
    decision: AuditDecision | None = None
    observation: AuditObservation | None = None
    # An outcome is a record of its own (join "outcome"), once per outcome event.
    outcome: AuditOutcome | None = None
    event_ids: tuple[str, ...] = ()
    written_at: UtcDatetime
    # When the writer received the (first) event. A record whose event claims a time
    # further than the allowed clock skew from this is filed under this day instead.
    received_at: UtcDatetime | None = None

    @property
    def primary(self) -> bool:
        """The request's one record (joined, or one half): not an amendment or outcome."""
        return self.join not in ("amendment", "outcome")

    @property
    def filed_at(self) -> datetime:
        """The time the record's day and windows go by: its event's time, or the time it
        was received when that is too far from the event's own."""
        part = self.decision or self.observation or self.outcome
        assert part is not None
        occurred = part.occurred_at
        if self.received_at is not None and occurred.astimezone(UTC).date().isoformat() \
                != self.day:
            return self.received_at
        return occurred


# How far an event's own time may be from when it was received before the record is filed
# by the time received: a producer's broken clock must not put records in 1970 (deleted by
# retention at once) or 2999.
DEFAULT_MAX_SKEW = timedelta(days=1)


def build_record(
    join: Join,
    request_id: str,
    decision: RouteDecided | None,
    observation: CompletionObserved | None,
    *,
    outcome: OutcomeReported | None = None,
    amends: str | None = None,
    now: datetime | None = None,
    received_at: datetime | None = None,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
) -> AuditRecord:
    """A record for ``AUDIT_DIR/<day>.jsonl``: the day of the decision (of the observation
    when there is none), unless that time is further than ``max_skew`` from when the
    writer received it."""
    anchor = decision or observation or outcome
    assert anchor is not None
    now = now or utc_now()
    received = received_at or now
    filed = anchor.occurred_at
    if abs(filed - received) > max_skew:
        filed = received
    return AuditRecord(
        request_id=request_id,
        day=filed.astimezone(UTC).date().isoformat(),
        join=join,
        amends=amends,
        decision=msgspec.convert(decision, AuditDecision, from_attributes=True)
        if decision else None,
        observation=msgspec.convert(observation, AuditObservation, from_attributes=True)
        if observation else None,
        outcome=msgspec.convert(outcome, AuditOutcome, from_attributes=True)
        if outcome else None,
        event_ids=tuple(str(e.event_id) for e in (decision, observation, outcome)
                        if e is not None),
        written_at=now,
        received_at=received,
    )


_DECODER = msgspec.json.Decoder(AuditRecord)


class RecordProblem(ValueError):
    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        # not_json or not_a_record: what a reader that skips the line counts it as.
        self.reason = reason


def read_record(line: bytes) -> AuditRecord:
    """Parse one line; RecordProblem says why it is not a well-formed, allow-listed record."""
    try:
        return _DECODER.decode(line)
    except msgspec.DecodeError as exc:
        raise RecordProblem(str(exc), unreadable(exc)) from None
