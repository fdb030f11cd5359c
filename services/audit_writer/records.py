"""Audit records: one per request, built from an explicit allow-list of fields.

The allow-list is the privacy firewall: a field added to an event later never reaches
the audit trail until someone adds it here, on purpose.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from routemesh.contracts import CompletionObserved, RouteDecided

RECORD_VERSION = 1
Join = Literal["joined", "decision_only", "observation_only", "amendment"]

_ATTEMPT_FIELDS = frozenset(
    {"layer", "selected_route", "confidence", "threshold", "latency_ms", "decided", "error"}
)
_FORMAT_FIELDS = frozenset(
    {"tools_present", "tool_history", "tool_choice", "message_count", "input_chars",
     "response_format"}
)
DECISION_FIELDS = frozenset(
    {
        "schema_version", "occurred_at", "route_id", "target_model", "reason", "layer", "score",
        "second_route_id", "second_score", "margin", "threshold", "required_margin",
        "attempts", "decision_latency_ms", "config_source", "config_sha256",
        "route_bank_sha256", "match_source", "match_index", "match_text_sha256",
        "match_score", "match_provenance", "prompt_sha256", "prompt_chars", "format",
        "requested_model", "gateway_instance",
    }
)
OBSERVATION_FIELDS = frozenset(
    {
        "schema_version", "occurred_at", "route_id", "target_model", "upstream_status",
        "duration_ms", "ttft_ms", "prompt_tokens", "completion_tokens", "total_tokens",
        "finish_reason", "tools_requested", "tools_used", "stream", "error_class",
        "escalation_path", "escalation_reason", "escalation_gates", "escalation_recovered",
    }
)
RECORD_FIELDS = frozenset(
    {"record_version", "request_id", "day", "join", "amends", "decision", "observation",
     "event_ids", "written_at"}
)
NESTED = {"attempts": _ATTEMPT_FIELDS, "format": _FORMAT_FIELDS}


def _allowed(event: msgspec.Struct, fields: frozenset[str]) -> dict[str, Any]:
    raw = msgspec.to_builtins(event)
    picked: dict[str, Any] = {}
    for key in sorted(fields):
        if key not in raw:
            continue
        value = raw[key]
        nested = NESTED.get(key)
        if nested is not None and isinstance(value, list):
            value = [{k: v for k, v in item.items() if k in nested} for item in value]
        elif nested is not None and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k in nested}
        picked[key] = value
    return picked


def decision_fields(event: RouteDecided) -> dict[str, Any]:
    return _allowed(event, DECISION_FIELDS)


def observation_fields(event: CompletionObserved) -> dict[str, Any]:
    return _allowed(event, OBSERVATION_FIELDS)


def build_record(
    join: Join,
    request_id: str,
    decision: RouteDecided | None,
    observation: CompletionObserved | None,
    *,
    amends: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A record for ``AUDIT_DIR/<day>.jsonl``; ``day`` is the UTC day of the decision
    (of the observation when there is no decision)."""
    anchor = decision or observation
    assert anchor is not None
    event_ids = [str(e.event_id) for e in (decision, observation) if e is not None]
    return {
        "record_version": RECORD_VERSION,
        "request_id": request_id,
        "day": anchor.occurred_at.astimezone(UTC).date().isoformat(),
        "join": join,
        "amends": amends,
        "decision": decision_fields(decision) if decision else None,
        "observation": observation_fields(observation) if observation else None,
        "event_ids": event_ids,
        "written_at": (now or datetime.now(UTC)).isoformat(),
    }


class RecordProblem(ValueError):
    pass


def check_record(record: Any) -> None:
    """Raise RecordProblem when a parsed line is not a well-formed, allow-listed record."""
    if not isinstance(record, dict):
        raise RecordProblem("not a JSON object")
    extra = set(record) - RECORD_FIELDS
    if extra:
        raise RecordProblem(f"fields outside the allow-list: {sorted(extra)}")
    if not isinstance(record.get("request_id"), str) or not record["request_id"]:
        raise RecordProblem("missing request_id")
    if record.get("join") not in ("joined", "decision_only", "observation_only", "amendment"):
        raise RecordProblem(f"unknown join {record.get('join')!r}")
    for part, allowed in (("decision", DECISION_FIELDS), ("observation", OBSERVATION_FIELDS)):
        value = record.get(part)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise RecordProblem(f"{part} is not an object")
        extra = set(value) - allowed
        if extra:
            raise RecordProblem(f"{part} fields outside the allow-list: {sorted(extra)}")
        for key, nested in NESTED.items():
            items = value.get(key)
            items = items if isinstance(items, list) else [items] if items else []
            for item in items:
                if isinstance(item, dict) and set(item) - nested:
                    raise RecordProblem(f"{part}.{key} fields outside the allow-list")
