"""Deterministic escalation gates: code that judges a cheap model's answer, never a model.

A gate reads the answer to decide and forgets it; only the names of the gates that
failed are kept (in the observation)."""

from __future__ import annotations

import json
from typing import Any

from routemesh.services.router import EscalationGates, RouteRequest


def failed_gates(request: RouteRequest, response: Any, gates: EscalationGates) -> list[str]:
    """The names of every gate the answer fails, in a fixed order; empty if it passes.

    An answer that is not a completion object fails ``empty``; an empty answer is not
    also reported ``too_short``."""
    choices = response.get("choices") if isinstance(response, dict) else None
    message = (choices[0] or {}).get("message") if choices else None
    if not isinstance(message, dict):
        return ["empty"]
    content = message.get("content")
    content = content if isinstance(content, str) else ""
    tool_calls = message.get("tool_calls") or []
    tool_required = request.tool_choice in ("required", "function")
    if gates.tool_call_when_required and request.tools_present and tool_required:
        return [] if tool_calls else ["tool_call_missing"]
    if tool_calls:
        return []
    text = content.strip()
    if not text:
        return ["empty"]
    failed = []
    if len(text) < gates.min_chars:
        failed.append("too_short")
    lowered = text.lower()
    if any(phrase.lower() in lowered for phrase in gates.refusal_phrases):
        failed.append("refusal")
    wants_json = request.response_format in ("json_object", "json_schema")
    if gates.json_when_asked and wants_json:
        try:
            json.loads(text)
        except ValueError:
            failed.append("invalid_json")
    return failed
