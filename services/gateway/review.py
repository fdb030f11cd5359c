"""Opt-in prompt capture for human review, kept apart from everything else: ``redacted``
writes with secrets masked to a local directory only, ``redacted_topic`` publishes the
same to ``prompts.review.v1`` (through a queue and spool of its own, under the review
directory), ``raw_local`` writes unmasked to a local directory only.
Off by default. Only the latest user message is captured, cut to a bounded length: what a
reviewer needs to judge a route, not the system prompt or tool output around it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from routemesh.contracts import PromptReviewCaptured, ReviewMessage, RouteDecided, encode_event
from routemesh.contracts.events import utc_now
from routemesh.services.runtime.files import open_private

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


@dataclass(frozen=True)
class Excerpt:
    """The latest user message, cut to ``max_chars``."""

    text: str
    original_chars: int

    @property
    def truncated(self) -> bool:
        return len(self.text) < self.original_chars

    @classmethod
    def of(cls, messages: tuple[tuple[str, str], ...], max_chars: int) -> Excerpt | None:
        for role, text in reversed(messages):
            if role == "user" and text:
                return cls(text[:max_chars], len(text))
        return None


def redacted_capture(decision: RouteDecided, excerpt: Excerpt) -> PromptReviewCaptured:
    text, count = redact(excerpt.text)
    return PromptReviewCaptured(
        request_id=decision.request_id, route_id=decision.route_id, reason=decision.reason,
        messages=(ReviewMessage(role="user", content=text),), redactions=count,
        original_chars=excerpt.original_chars, truncated=excerpt.truncated,
    )


def write_redacted_local(directory: Path, captured: PromptReviewCaptured) -> None:
    """The redacted capture as a line of the day's file, private to the gateway's user:
    the event as it would be published, read back by the same readers."""
    with open_private(directory / f"{utc_now().date().isoformat()}.jsonl",
                      append=True) as handle:
        handle.write(encode_event(captured).decode() + "\n")


def write_raw_local(directory: Path, decision: RouteDecided, excerpt: Excerpt) -> None:
    day = utc_now().date().isoformat()
    line = json.dumps({
        "request_id": decision.request_id, "route_id": decision.route_id,
        "reason": decision.reason, "messages": [["user", excerpt.text]],
        "original_chars": excerpt.original_chars, "truncated": excerpt.truncated,
    })
    with open_private(directory / f"{day}.jsonl", append=True) as handle:
        handle.write(line + "\n")
