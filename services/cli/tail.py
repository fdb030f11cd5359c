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
    raw: bool = False,
) -> int:
    """Print each event as one JSON line on stdout, so the output is safe for ``jq``;
    a value that is no event goes to stderr (its error and its bytes in base64), or with
    ``raw`` to stdout as it came. Returns how many records were read."""
    printed = 0
    if limit is not None and limit <= 0:
        return printed
    records = read_records(settings, topic, from_beginning=from_beginning, idle_s=idle_s)
    async with contextlib.aclosing(records):
        async for record in records:
            _print_record(record.value, raw)
            printed += 1
            if limit is not None and printed >= limit:
                break
    return printed


def _print_record(value: bytes | None, raw: bool) -> None:
    data = value or b""
    try:
        decode_event(data)
    except EventDecodeError as exc:
        if not raw:
            print(f"undecodable ({exc.kind}): {exc.message}; value (base64): "
                  f"{base64.b64encode(data).decode()}", file=sys.stderr, flush=True)
            return
    sys.stdout.write(data.decode("utf-8", "replace").replace("\n", " ") + "\n")
    sys.stdout.flush()
