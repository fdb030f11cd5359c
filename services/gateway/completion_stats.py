"""What the gateway notes of an answer (finish reason, token usage, tool calls) for the
observation, whether it arrives whole or as a server-sent event stream. Nothing of the
content is kept."""

from __future__ import annotations

import json
import re
from typing import Any

_FINISH = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class CompletionStats:
    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.tools_used = False
        self._buffer = b""

    @classmethod
    def of_parsed(cls, body: Any) -> CompletionStats:
        """Of a whole (non-streamed) chat completion, parsed; anything else notes nothing."""
        stats = cls()
        stats._note(body, delta=False)
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
            finish = choice.get("finish_reason")
            if isinstance(finish, str):
                # An upstream's word, bounded before it reaches an event.
                self.finish_reason = finish if _FINISH.match(finish) else "other"
            message = choice.get("delta" if delta else "message") or {}
            if isinstance(message, dict) and message.get("tool_calls"):
                self.tools_used = True
