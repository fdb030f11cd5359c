"""`routemesh tail`: print a topic's events as JSON lines."""

from __future__ import annotations

import base64
import contextlib
import sys

from routemesh.contracts import EventDecodeError, decode_event
from routemesh.services.runtime.consumer import read_records
from routemesh.services.runtime.settings import ServiceSettings


async def tail_topic(
    settings: ServiceSettings,
    topic: str,
    *,
    from_beginning: bool,
    limit: int | None,
    idle_s: float | None,
) -> int:
    """Print each value as one line on stdout; undecodable ones are flagged on stderr."""
    printed = 0
    if limit is not None and limit <= 0:
        return printed
    records = read_records(settings, topic, from_beginning=from_beginning, idle_s=idle_s)
    async with contextlib.aclosing(records):
        async for record in records:
            _print_record(record.value)
            printed += 1
            if limit is not None and printed >= limit:
                break
    return printed


def _print_record(value: bytes | None) -> None:
    try:
        decode_event(value or b"")
    except EventDecodeError as exc:
        print(f"undecodable ({exc.kind}): {exc.message}", file=sys.stderr)
        if value and value.lstrip()[:1] != b"{":
            print(base64.b64encode(value).decode(), flush=True)
            return
    sys.stdout.write((value or b"").decode("utf-8", "replace") + "\n")
    sys.stdout.flush()
