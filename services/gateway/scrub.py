"""Upstream keys never reach a client: every configured upstream key is masked in what the
gateway relays (an upstream may echo the key it was sent, in an error message or
anywhere else). The gateway relays no upstream headers, only bodies."""

from __future__ import annotations

from collections.abc import Iterable

MASK = b"[REDACTED]"


class Scrubber:
    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a key that contains another is masked whole.
        self.secrets = sorted({s.encode() for s in secrets if s}, key=len, reverse=True)

    def __call__(self, data: bytes) -> bytes:
        for secret in self.secrets:
            if secret in data:
                data = data.replace(secret, MASK)
        return data

    def stream(self) -> StreamScrubber:
        return StreamScrubber(self)


class StreamScrubber:
    """Scrubs a stream whose pieces may cut a key in two. Keys hold no newline, so
    everything up to a piece's last newline is scrubbed and passed on at once, and only
    an unfinished line waits for the next piece. A server-sent event ends with a newline:
    a relayed event is never held back."""

    def __init__(self, scrub: Scrubber) -> None:
        self.scrub = scrub
        self._rest = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self.scrub.secrets:
            return chunk
        data = self._rest + chunk
        cut = data.rfind(b"\n") + 1
        self._rest = data[cut:]
        return self.scrub(data[:cut])

    def flush(self) -> bytes:
        rest, self._rest = self._rest, b""
        return self.scrub(rest)
