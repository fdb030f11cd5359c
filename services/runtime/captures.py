"""Review capture files, read back: the gateway's opt-in ``raw_local`` directory, or
redacted ``PromptReviewCaptured`` events saved as JSON lines. The scorer reads whether a
request has local evidence; the replay worker reads the text to decide it again."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import msgspec

from routemesh.services.runtime.files import Skipped, decoded_lines

CaptureMode = Literal["raw_local", "redacted"]


class _CaptureLine(msgspec.Struct, kw_only=True):
    request_id: str
    route_id: str | None = None
    reason: str | None = None
    original_chars: int | None = None
    truncated: bool = False
    type: str | None = None
    messages: list[Any] = []


class Capture(msgspec.Struct, frozen=True, kw_only=True):
    mode: CaptureMode
    chars: int | None
    truncated: bool
    text: str | None = None
    # The route and reason the gateway decided when it captured the request.
    route_id: str | None = None
    reason: str | None = None


def _text(messages: list[Any]) -> str:
    parts = []
    for message in messages:
        if isinstance(message, list) and len(message) == 2:
            parts.append(str(message[1]))
        elif isinstance(message, dict):
            parts.append(str(message.get("content", "")))
    return "\n".join(parts)


def read_captures(directory: Path, *, with_text: bool = False,
                  skipped: Skipped | None = None) -> dict[str, Capture]:
    """Every capture in ``directory``'s JSON-lines files by request id; a line that is
    no capture is counted in ``skipped``."""
    found: dict[str, Capture] = {}
    for row in decoded_lines(directory, msgspec.json.Decoder(_CaptureLine), skipped):
        mode: CaptureMode = "redacted" if row.type == "PromptReviewCaptured" else "raw_local"
        text = _text(row.messages)
        found[row.request_id] = Capture(
            mode=mode, chars=row.original_chars if row.original_chars is not None
            else len(text), truncated=row.truncated, text=text if with_text else None,
            route_id=row.route_id, reason=row.reason)
    return found
