"""The audit-writer service: consume decisions and observations, join them, append one
record per request, and let the consumer commit offsets only once the records covering
them are on disk.

Instances of one consumer group share the audit directory: each writes the files of the
partitions it owns (a request's events share a partition), so the trail is one directory
however many write it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Collection, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import Field

from routemesh.contracts.events import utc_now
from routemesh.contracts.topics import LLM_OBSERVATIONS, ROUTE_DECISIONS, ROUTE_OUTCOMES
from routemesh.services.audit_writer.joiner import Joiner, Output
from routemesh.services.audit_writer.records import AuditRecord, Join
from routemesh.services.audit_writer.store import AuditStore
from routemesh.services.runtime.consumer import Delivery, OffsetTracker, PartitionKey
from routemesh.services.runtime.kafka import RetryableError
from routemesh.services.runtime.service import ServiceContext, ServiceSpec, metrics_port
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
    # An event whose own time is further than this from its arrival is filed by arrival.
    audit_max_clock_skew_s: float = Field(default=86400.0, gt=0)
    # At a stop, write what waits in the join window (decision or observation only)
    # instead of leaving it to be redelivered: for a broker that keeps nothing across the
    # stop (`routemesh dev`). A partner that comes later is written as an amendment.
    audit_flush_on_stop: bool = False


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter("routemesh_audit_records_written_total",
                               "Audit records written, by join outcome", ["join"],
                               registry=registry)
        # Every series from the start (at 0): an alert on "nothing written" must see a
        # writer that has not written its first record since it started.
        for join in get_args(Join):
            self.records.labels(join)
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


class AuditWriter:
    def __init__(self, ctx: ServiceContext) -> None:
        settings = ctx.settings
        assert isinstance(settings, AuditWriterSettings)
        self.ctx = ctx
        self.settings = settings
        self.store = AuditStore(
            settings.audit_dir,
            max_file_bytes=settings.audit_max_file_bytes,
            fsync=settings.audit_fsync,
            dedup_capacity=settings.audit_dedup_capacity,
        )
        self.metrics = _Metrics(ctx.registry)
        self.consumer = ctx.consumer(
            [ROUTE_DECISIONS, LLM_OBSERVATIONS, ROUTE_OUTCOMES], GROUP, self,
            batch_max_records=settings.audit_batch_max_records, poll_ms=settings.audit_poll_ms,
            on_assigned=self.assigned,
        )
        self.joiner = Joiner(self.store, self.consumer.offsets, settings.audit_join_window_s,
                             timedelta(seconds=settings.audit_max_clock_skew_s))
        self._last_maintenance = 0.0

    async def start(self) -> None:
        self.ctx.readiness.set("audit_dir", True, "writable")
        await self.consumer.start()

    async def assigned(self, partitions: Collection[PartitionKey]) -> None:
        """A partition's dedup state is what its files hold, whoever wrote them: read
        before its first events are joined."""
        numbers = {partition for _, partition in partitions} - self.store.loaded
        if numbers:
            started = time.perf_counter()
            loaded = await asyncio.to_thread(self.store.load_index, numbers)
            log.info("audit index read for assigned partitions",
                     extra={"partitions": sorted(numbers), "records": loaded,
                            "seconds": round(time.perf_counter() - started, 3)})

    async def stop(self) -> None:
        """Stop consuming; write and commit what is complete; keep the rest held (or
        write it, with ``audit_flush_on_stop``)."""
        await self.consumer.stop()
        if self.settings.audit_flush_on_stop:
            outputs = self.joiner.expire(math.inf)
            if outputs:
                await asyncio.to_thread(self._append, outputs)
                log.info("join window written at stop", extra={"records": len(outputs)})
        self.store.close()

    async def handle(self, deliveries: Sequence[Delivery], offsets: OffsetTracker) -> None:
        now, received = time.monotonic(), utc_now()
        outputs: list[Output] = []
        before = self.joiner.stats.dedup_hits
        for delivery in deliveries:
            outputs += self.joiner.add(delivery.event, delivery.position, now, received)
        self.metrics.dedup.inc(self.joiner.stats.dedup_hits - before)
        outputs += self.joiner.expire(now)
        if outputs:
            await self._write(outputs)
            for output in outputs:
                self.metrics.records.labels(output.record.join).inc()
                for position in output.positions:
                    offsets.release(position)
        self.metrics.held.set(offsets.held_count())
        await self._maintain()

    def revoked(self, partitions: Collection[PartitionKey]) -> None:
        self.joiner.drop_partitions(partitions)
        # What is held for a partition goes back with it; its index too, since the next
        # owner adds to its files.
        self.store.forget_partitions({partition for _, partition in partitions})

    def _append(self, outputs: list[Output]) -> tuple[float, float]:
        """Each partition's records to its own files; (write, fsync) seconds in all."""
        by_partition: dict[int, list[AuditRecord]] = defaultdict(list)
        for output in outputs:
            by_partition[output.partition].append(output.record)
        write_s = fsync_s = 0.0
        for partition, records in by_partition.items():
            wrote, synced = self.store.append(records, partition)
            write_s, fsync_s = write_s + wrote, fsync_s + synced
        return write_s, fsync_s

    async def _write(self, outputs: list[Output]) -> None:
        try:
            write_s, fsync_s = await asyncio.to_thread(self._append, outputs)
        except OSError as exc:
            # The batch's records were marked as written before the write failed: forget
            # that (rebuild the index from what really is on disk) and have the consumer
            # deliver everything since the last commit again.
            log.error("audit write failed; retrying from the last commit",
                      extra={"error": str(exc)})
            with contextlib.suppress(OSError):
                self.store.close()
            await asyncio.to_thread(self.store.rebuild_index)
            raise RetryableError(f"audit write failed: {exc}") from exc
        self.metrics.write.observe(write_s)
        self.metrics.fsync.observe(fsync_s)

    async def _maintain(self) -> None:
        now = time.monotonic()
        if now - self._last_maintenance < self.settings.audit_maintenance_interval_s:
            return
        self._last_maintenance = now
        compressed, deleted = await asyncio.to_thread(
            self.store.maintain,
            utc_now().date(),
            retention_days=self.settings.audit_retention_days,
            retention_bytes=self.settings.audit_retention_bytes,
            partitions=self.store.loaded,
        )
        if compressed or deleted:
            log.info("audit files maintained",
                     extra={"compressed": len(compressed), "deleted": len(deleted)})


SPEC = ServiceSpec(
    name="audit-writer",
    settings_class=AuditWriterSettings,
    factory=AuditWriter,
    ports=(metrics_port(9102),),
    description="one metadata-only JSONL audit record per request",
    # The instances share one trail, as their pods share one volume.
    dev_env=lambda data_dir, instance: {"ROUTEMESH_AUDIT_DIR": str(data_dir / "audit"),
                                        "ROUTEMESH_AUDIT_FLUSH_ON_STOP": "true"},
)
