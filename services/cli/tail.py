"""`routemesh tail`: print a topic's events as JSON lines."""

from __future__ import annotations

import asyncio
import base64
import sys

from aiokafka import AIOKafkaConsumer, TopicPartition

from routemesh.contracts import EventDecodeError, decode_event
from routemesh.services.runtime.kafka import client_kwargs
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
    # No consumer group: tailing must not move anyone's committed offsets.
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)
    try:
        await consumer.start()
    except BaseException:
        await consumer.stop()
        raise
    printed = 0
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            print(f"topic {topic} does not exist", file=sys.stderr)
            return 0
        assignment = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assignment)
        if from_beginning:
            await consumer.seek_to_beginning(*assignment)
        else:
            await consumer.seek_to_end(*assignment)
        while limit is None or printed < limit:
            batch = await consumer.getmany(timeout_ms=int((idle_s or 3600) * 1000))
            if not batch:
                if idle_s is not None:
                    break
                continue
            for records in batch.values():
                for record in records:
                    _print_record(record.value)
                    printed += 1
                    if limit is not None and printed >= limit:
                        break
                if limit is not None and printed >= limit:
                    break
    except asyncio.CancelledError:
        pass
    finally:
        await consumer.stop()
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
