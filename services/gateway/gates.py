"""Deterministic escalation gates: code that judges a cheap model's answer, never a model.

A gate reads the answer to decide and forgets it; only the name of the gate that
failed is kept (in the observation)."""

from __future__ import annotations

import json
from typing import Any

from routemesh.services.router.config import EscalationGates


def failed_gate(request: dict[str, Any], response: Any, gates: EscalationGates) -> str | None:
    """The name of the first gate the answer fails, or None if it passes them all."""
    choices = response.get("choices") if isinstance(response, dict) else None
    message = (choices[0] or {}).get("message") if choices else None
    if not isinstance(message, dict):
        return "empty"
    content = message.get("content") if isinstance(message.get("content"), str) else ""
    tool_calls = message.get("tool_calls") or []
    choice = request.get("tool_choice")
    tool_required = choice == "required" or isinstance(choice, dict)
    if gates.tool_call_when_required and request.get("tools") and tool_required:
        return None if tool_calls else "tool_call_missing"
    if tool_calls:
        return None
    text = content.strip()
    if not text:
        return "empty"
    if len(text) < gates.min_chars:
        return "too_short"
    lowered = text.lower()
    if any(phrase in lowered for phrase in gates.refusal_phrases):
        return "refusal"
    wants_json = (request.get("response_format") or {}).get("type") in ("json_object",
                                                                       "json_schema")
    if gates.json_when_asked and wants_json:
        try:
            json.loads(text)
        except ValueError:
            return "invalid_json"
    return None
