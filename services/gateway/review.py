"""Opt-in prompt capture for human review, kept apart from everything else: ``redacted``
publishes to ``prompts.review.v1`` with secrets masked, ``raw_local`` writes to a local
directory only. Off by default."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

from routemesh.contracts import PromptReviewCaptured, ReviewMessage, RouteDecided

# Order matters: a bearer token may look like base64, an sk- key too.
_SECRETS = [
    ("bearer", re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}")),
    ("sk", re.compile(r"\bsk-[A-Za-z0-9_-]{8,}")),
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")),
    ("base64", re.compile(r"\b[A-Za-z0-9+/]{40,}={0,2}")),
]


def redact(text: str) -> tuple[str, int]:
    count = 0
    for kind, pattern in _SECRETS:
        text, found = pattern.subn(f"[REDACTED:{kind}]", text)
        count += found
    return text, count


def redacted_capture(
    decision: RouteDecided, messages: tuple[tuple[str, str], ...]
) -> PromptReviewCaptured:
    cleaned, total = [], 0
    for role, content in messages:
        text, count = redact(content)
        cleaned.append(ReviewMessage(role=role, content=text))
        total += count
    return PromptReviewCaptured(
        request_id=decision.request_id, route_id=decision.route_id, reason=decision.reason,
        messages=tuple(cleaned), redactions=total,
    )


def write_raw_local(
    directory: Path, decision: RouteDecided, messages: tuple[tuple[str, str], ...]
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    day = datetime.now(UTC).date().isoformat()
    line = json.dumps({
        "request_id": decision.request_id, "route_id": decision.route_id,
        "reason": decision.reason, "messages": [list(m) for m in messages],
    })
    with (directory / f"{day}.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
