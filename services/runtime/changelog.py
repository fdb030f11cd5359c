"""A consumer's state on a compacted topic, key by key, as Kafka Streams keeps a store's
changelog: partition p of the changelog holds the state of input partition p, so the
instance that is given p restores p's state from there, wherever it ran before.

A write is the changed keys of one partition (None: the key is gone) followed by a mark
carrying what the state covers (the input offsets). A restore reads a partition to its
end and keeps what the last mark covers: keys written after it belong to a write a crash
cut short; they are reported as ``torn`` so the next write supersedes them.

Why not one record per partition's whole state: it outgrows a record (the broker's
1 MB default) with the joins it holds, and every save would rewrite all of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from routemesh.contracts import Topic
from routemesh.services.runtime.kafka import client_kwargs, delivery_options
from routemesh.services.runtime.settings import ServiceSettings

MARK = b"\x00mark"
# One partition's record: (key, value); None for a deleted key.
Apply = Callable[[int, bytes, bytes | None], None]


class ChangelogMismatch(RuntimeError):
    pass


@dataclass
class Restored:
    """One partition's state as of its last mark."""

    values: dict[bytes, bytes] = field(default_factory=dict)
    mark: bytes | None = None
    torn: set[bytes] = field(default_factory=set)


def fold(records: Iterable[tuple[bytes, bytes | None]]) -> Restored:
    """A partition's records, in order, to its state as of the last mark."""
    found: Restored = Restored()
    after_mark: dict[bytes, bytes | None] = {}
    for key, value in records:
        if key != MARK:
            after_mark[key] = value
            continue
        for changed, new in after_mark.items():
            if new is None:
                found.values.pop(changed, None)
            else:
                found.values[changed] = new
        after_mark.clear()
        found.mark = value
    found.torn = set(after_mark)
    return found


CHANGELOG_MAX_RECORD_BYTES = 16 * 1024 * 1024


class Changelog:
    def __init__(self, settings: ServiceSettings, topic: Topic, service: str) -> None:
        self.settings = settings
        self.name = settings.topic(topic)
        self.partitions = topic.partitions
        # aiokafka checks a record's size before compression; the broker checks the
        # compressed batch (max.message.bytes), and a state's records (windows, ledgers)
        # repeat their names and hashes, so they shrink many times over.
        self._producer = AIOKafkaProducer(
            **client_kwargs(settings), client_id=f"routemesh-{service}-changelog",
            **delivery_options(settings), max_request_size=CHANGELOG_MAX_RECORD_BYTES)

    async def start(self) -> None:
        """Refuses a changelog whose partitions are not the inputs' (made by hand, or by
        a broker that creates topics on first use): partition p holds input p's state."""
        await self._producer.start()
        try:
            found = len(await self._producer.partitions_for(self.name))
        except KafkaError:
            found = 0
        if found != self.partitions:
            await self._producer.stop()
            raise ChangelogMismatch(
                f"{self.name} has {found} partitions and must have {self.partitions}, one "
                "per input partition: run `routemesh topics create` (deleting it first if "
                "it exists)")

    async def stop(self) -> None:
        await self._producer.stop()

    async def write(self, partition: int, changes: Mapping[bytes, bytes | None],
                    mark: bytes) -> None:
        """Returns once the broker confirmed every change and the mark after them."""
        sent = [await self._producer.send(self.name, value, key=key, partition=partition)
                for key, value in changes.items()]
        sent.append(await self._producer.send(self.name, mark, key=MARK,
                                              partition=partition))
        await asyncio.gather(*sent)

    async def read(self, partitions: Collection[int], timeout_s: float = 120.0
                   ) -> dict[int, Restored]:
        """Each partition's state as of its last mark, read to the partition's end."""
        records: dict[int, list[tuple[bytes, bytes | None]]] = {p: [] for p in partitions}
        async with asyncio.timeout(timeout_s):
            await self._read(partitions, lambda p, key, value: records[p].append((key, value)),
                             until_end=True)
        return {p: fold(found) for p, found in records.items()}

    async def follow(self, apply: Apply, caught_up: asyncio.Event) -> None:
        """Every record of every partition from the start, as it comes, until
        cancelled; ``caught_up`` is set once all that was there at the start is read."""
        await self._read(range(self.partitions), apply, until_end=False, caught_up=caught_up)

    async def _read(self, partitions: Collection[int], apply: Apply, *, until_end: bool,
                    caught_up: asyncio.Event | None = None) -> None:
        if not partitions:
            return
        # No consumer group: reading moves nobody's offsets, and every reader sees all.
        consumer = AIOKafkaConsumer(**client_kwargs(self.settings), enable_auto_commit=False)
        await consumer.start()
        try:
            assignment = [TopicPartition(self.name, p) for p in partitions]
            consumer.assign(assignment)
            await consumer.seek_to_beginning(*assignment)
            while True:
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                for tp, records in batch.items():
                    for record in records:
                        apply(tp.partition, record.key, record.value)
                # The end is a fetch's high watermark: the embedded broker's ListOffsets
                # stops short of it (see PartitionLogs).
                at_end = True
                for tp in assignment:
                    end = consumer.highwater(tp)
                    at_end = at_end and end is not None and await consumer.position(tp) >= end
                if at_end and caught_up is not None:
                    caught_up.set()
                if at_end and until_end:
                    return
        finally:
            await consumer.stop()
