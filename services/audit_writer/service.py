"""The audit-writer service: consume decisions and observations, join them, append one
record per request, commit offsets only once the records covering them are on disk.

It runs its own aiokafka consumer instead of a FastStream subscriber because a message
held in the join window must hold back its partition's committed offset, which
FastStream's per-message acknowledgement (commit everything consumed) cannot express.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from prometheus_client import Counter, Gauge, Histogram
from pydantic import Field

from routemesh.contracts import EventDecodeError, decode_event
from routemesh.contracts.topics import LLM_OBSERVATIONS, ROUTE_DECISIONS
from routemesh.services.audit_writer.joiner import Joiner, OffsetTracker, Output
from routemesh.services.audit_writer.store import AuditStore
from routemesh.services.runtime.kafka import client_kwargs
from routemesh.services.runtime.service import ServiceContext, ServiceSpec
from routemesh.services.runtime.settings import ServiceSettings

log = logging.getLogger(__name__)
GROUP = "routemesh-audit-writer"


class AuditWriterSettings(ServiceSettings):
    audit_dir: Path = Path("audit")
    audit_join_window_s: float = Field(default=120.0, gt=0)
    audit_fsync: Literal["batch", "off"] = "batch"
    audit_max_file_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    audit_retention_days: int = Field(default=30, ge=1)
    audit_retention_bytes: int = Field(default=20 * 1024**3, gt=0)
    audit_dedup_capacity: int = Field(default=2_000_000, ge=1000)
    audit_batch_max_records: int = Field(default=2000, ge=1)
    audit_poll_ms: int = Field(default=100, ge=1)
    audit_maintenance_interval_s: float = Field(default=60.0, gt=0)


class _Metrics:
    def __init__(self, registry) -> None:
        self.records = Counter("routemesh_audit_records_written_total",
                               "Audit records written, by join outcome", ["join"],
                               registry=registry)
        self.dedup = Counter("routemesh_audit_dedup_hits_total",
                             "Redelivered or duplicate events skipped", registry=registry)
        buckets = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
        self.write = Histogram("routemesh_audit_write_seconds",
                               "Time to write (and flush) one batch of records",
                               registry=registry, buckets=buckets)
        self.fsync = Histogram("routemesh_audit_fsync_seconds",
                               "Time to fsync the files of one batch", registry=registry,
                               buckets=buckets)
        self.held = Gauge("routemesh_audit_join_window_events",
                          "Events waiting in the join window for their partner",
                          registry=registry)
        self.lag = Gauge("routemesh_audit_consumer_lag_messages",
                         "Messages between the consumer position and the partition end",
                         ["topic", "partition"], registry=registry)


class AuditWriter:
    def __init__(self, ctx: ServiceContext, settings: AuditWriterSettings) -> None:
        self.ctx = ctx
        self.settings = settings
        self.store = AuditStore(
            settings.audit_dir,
            max_file_bytes=settings.audit_max_file_bytes,
            fsync=settings.audit_fsync,
            dedup_capacity=settings.audit_dedup_capacity,
        )
        self.tracker = OffsetTracker()
        self.joiner = Joiner(self.store, self.tracker, settings.audit_join_window_s)
        self.metrics = _Metrics(ctx.registry)
        self.topics = [settings.topic(ROUTE_DECISIONS), settings.topic(LLM_OBSERVATIONS)]
        self.accepted = set(ROUTE_DECISIONS.events) | set(LLM_OBSERVATIONS.events)
        self.consumer: AIOKafkaConsumer | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_maintenance = 0.0

    async def start(self) -> None:
        loaded = await asyncio.to_thread(self.store.load_index)
        log.info("audit index rebuilt", extra={"records": loaded})
        self.consumer = AIOKafkaConsumer(
            **client_kwargs(self.settings),
            group_id=GROUP,
            client_id=f"routemesh-audit-writer-{self.settings.instance_id or 'single'}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Both topics are keyed by request_id with equal partition counts; the range
            # assignor gives one consumer the same partitions of both, so pairs meet.
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_poll_interval_ms=300_000,
        )
        self.consumer.subscribe(self.topics, listener=_Rebalance(self))
        await self.consumer.start()
        self.ctx.readiness.set("audit_dir", True, "writable")
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop consuming; write and commit what is complete; keep the rest held."""
        self._stopping.set()
        if self._task is not None:
            await self._task
        if self.consumer is not None:
            await self.consumer.stop()
        self.store.close()

    async def _run(self) -> None:
        assert self.consumer is not None
        while not self._stopping.is_set():
            batch = await self.consumer.getmany(
                timeout_ms=self.settings.audit_poll_ms,
                max_records=self.settings.audit_batch_max_records,
            )
            outputs: list[Output] = []
            now = time.monotonic()
            for tp, records in batch.items():
                for record in records:
                    position = (tp.topic, tp.partition, record.offset)
                    self.tracker.consumed(position)
                    try:
                        event = decode_event(record.value or b"", self.accepted)
                    except EventDecodeError as exc:
                        await self._dead_letter(record, position, exc)
                        continue
                    before = self.joiner.stats.dedup_hits
                    outputs += self.joiner.add(event, position, now)
                    self.metrics.dedup.inc(self.joiner.stats.dedup_hits - before)
            outputs += self.joiner.expire(now)
            await self._flush(outputs)
            await self._maintain()

    async def _dead_letter(self, record, position, exc: EventDecodeError) -> None:
        """Publish the dead letter, retrying while the broker refuses. Its offset is held
        until it is sent, so a stop (or crash) meanwhile never commits past it."""
        self.tracker.hold(position)
        delay = 0.5
        while True:
            try:
                await self.ctx.dead_letters.send(record, GROUP, exc.kind, str(exc))
            except Exception:
                log.exception("could not publish a dead letter; retrying")
                if self._stopping.is_set():
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            else:
                self.tracker.release(position)
                return

    async def _flush(self, outputs: list[Output]) -> None:
        if outputs:
            write_s, fsync_s = await asyncio.to_thread(
                self.store.append, [o.record for o in outputs]
            )
            self.metrics.write.observe(write_s)
            self.metrics.fsync.observe(fsync_s)
            for output in outputs:
                self.metrics.records.labels(output.record["join"]).inc()
                for position in output.positions:
                    self.tracker.release(position)
        await self.commit()
        self.metrics.held.set(self.tracker.held_count())

    async def commit(self) -> None:
        assert self.consumer is not None
        moved = self.tracker.to_commit()
        if not moved:
            return
        await self.consumer.commit({TopicPartition(t, p): o for (t, p), o in moved.items()})
        self.tracker.committed(moved)
        for (topic, partition), offset in moved.items():
            highwater = self.consumer.highwater(TopicPartition(topic, partition))
            if highwater is not None:
                self.metrics.lag.labels(topic, str(partition)).set(max(highwater - offset, 0))

    async def _maintain(self) -> None:
        now = time.monotonic()
        if now - self._last_maintenance < self.settings.audit_maintenance_interval_s:
            return
        self._last_maintenance = now
        compressed, deleted = await asyncio.to_thread(
            self.store.maintain,
            datetime.now(UTC).date(),
            retention_days=self.settings.audit_retention_days,
            retention_bytes=self.settings.audit_retention_bytes,
        )
        if compressed or deleted:
            log.info("audit files maintained",
                     extra={"compressed": len(compressed), "deleted": len(deleted)})


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, writer: AuditWriter) -> None:
        self.writer = writer

    async def on_partitions_revoked(self, revoked) -> None:
        # Commit what is safe; what we held goes back to the partition's next owner.
        with contextlib.suppress(Exception):
            await self.writer.commit()
        keys = {(tp.topic, tp.partition) for tp in revoked}
        self.writer.joiner.drop_partitions(keys)
        self.writer.tracker.forget(keys)

    async def on_partitions_assigned(self, assigned) -> None:
        pass


async def setup(ctx: ServiceContext) -> None:
    settings = ctx.settings
    assert isinstance(settings, AuditWriterSettings)
    writer = AuditWriter(ctx, settings)
    ctx.on_startup.append(writer.start)
    ctx.on_shutdown.append(writer.stop)


SPEC = ServiceSpec(
    name="audit-writer",
    settings_class=AuditWriterSettings,
    setup=setup,
    default_metrics_port=9102,
    description="one metadata-only JSONL audit record per request",
    dev_env=lambda data_dir: {"ROUTEMESH_AUDIT_DIR": str(Path(data_dir) / "audit")},
)
