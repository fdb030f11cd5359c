"""What the gateway notes of an answer (finish reason, token usage, tool calls) for the
observation, whether it arrives whole or as a server-sent event stream. Nothing of the
content is kept."""

from __future__ import annotations

import contextlib
import json
from typing import Any


class CompletionStats:
    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.tools_used = False
        self._buffer = b""

    @classmethod
    def of_body(cls, body: bytes) -> CompletionStats:
        """Of a whole (non-streamed) chat completion; a body that is not JSON notes nothing."""
        stats = cls()
        with contextlib.suppress(ValueError):
            stats._note(json.loads(body), delta=False)
        return stats

    def feed(self, chunk: bytes) -> None:
        """One piece of a relayed SSE stream; events may span pieces."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            try:
                event = json.loads(line[5:])
            except ValueError:
                continue
            self._note(event, delta=True)

    def tokens(self, key: str) -> int | None:
        value = self.usage.get(key)
        return value if isinstance(value, int) and value >= 0 else None

    def _note(self, body: Any, delta: bool) -> None:
        if not isinstance(body, dict):
            return
        if isinstance(body.get("usage"), dict):
            self.usage = body["usage"]
        for choice in body.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            if isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]
            message = choice.get("delta" if delta else "message") or {}
            if isinstance(message, dict) and message.get("tool_calls"):
                self.tools_used = True
