"""The writer's handler when the disk fails (nothing is acknowledged that is not on disk)
and when its partitions move to another writer of the group."""

import json
from datetime import date, timedelta
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from routemesh.services.audit_writer.records import build_record
from routemesh.services.audit_writer.reports import verify
from routemesh.services.audit_writer.service import AuditWriter, AuditWriterSettings
from routemesh.services.audit_writer.store import AuditStore, list_files, read_lines
from routemesh.services.runtime.consumer import Delivery, OffsetTracker
from routemesh.services.runtime.kafka import RetryableError
from routemesh.services.runtime.telemetry import Readiness
from tests.services.audit_writer.helpers import DAY, decision, observation

D, O = "d", "o"  # noqa: E741 (topic initials)


def writer(tmp_path) -> AuditWriter:
    offsets = OffsetTracker()

    def consumer(topics, group_id, handler, **options):
        return SimpleNamespace(offsets=offsets)

    ctx = SimpleNamespace(settings=AuditWriterSettings(audit_dir=tmp_path),
                          registry=CollectorRegistry(), readiness=Readiness(),
                          consumer=consumer)
    return AuditWriter(ctx)


def pair(request_id: str, offset: int) -> list[Delivery]:
    return [Delivery(decision(request_id), (D, 0, offset)),
            Delivery(observation(request_id), (O, 0, offset))]


async def test_a_failed_write_asks_for_a_retry_and_forgets_what_it_did_not_write(
    tmp_path, monkeypatch
):
    audit = writer(tmp_path)
    offsets = audit.consumer.offsets
    await audit.assigned({(D, 0), (O, 0)})
    await audit.handle(pair("written", 0), offsets)

    def disk_full(records, partition):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit.store, "append", disk_full)
    with pytest.raises(RetryableError):
        await audit.handle(pair("lost", 1), offsets)
    assert audit.store.state("written") is not None, "the index was rebuilt from the files"
    assert audit.store.state("lost") is None, "so its redelivery is written, not skipped"
    monkeypatch.undo()
    audit.revoked({(D, 0), (O, 0)})
    await audit.assigned({(D, 0), (O, 0)})
    await audit.handle(pair("lost", 1), offsets)
    assert audit.store.state("lost").has_observation
    audit.store.close()


async def test_writers_of_one_group_share_the_trail_and_a_moved_partition_keeps_its_dedup(
    tmp_path
):
    """Writer A owns partition 0 and writes a request, but crashes before committing; the
    partition moves to writer B, which gets the request again from the last commit (and a
    held decision of another). B writes only what A did not, to partition 0's files."""
    first, second = writer(tmp_path), writer(tmp_path)
    await first.assigned({(D, 0), (O, 0), (D, 1), (O, 1)})
    await first.handle([*pair("done", 0), Delivery(decision("waiting"), (D, 0, 1)),
                        Delivery(decision("other"), (D, 1, 0)),
                        Delivery(observation("other"), (O, 1, 0))], first.consumer.offsets)
    first.revoked({(D, 0), (O, 0)})
    await second.assigned({(D, 0), (O, 0)})
    await second.handle(pair("done", 0) + pair("waiting", 1), second.consumer.offsets)
    first.store.close()
    second.store.close()
    names = [f.path.name[10:] for f in list_files(tmp_path)]
    assert names == ["-p0.jsonl", "-p1.jsonl"], "one file per partition, after the day"
    by_file = {f.partition: [json.loads(line)["request_id"] for _, line in read_lines(f)]
               for f in list_files(tmp_path)}
    assert by_file == {0: ["done", "waiting"], 1: ["other"]}
    assert verify(tmp_path) == (3, [])
    assert second.metrics.dedup._value.get() == 2, "the decision and observation of 'done'"


async def test_a_writer_maintains_only_the_files_of_its_partitions(tmp_path):
    """Another writer may be appending to a past day's file of its own partition."""
    mine, theirs = AuditStore(tmp_path), AuditStore(tmp_path)
    yesterday = decision("y", DAY - timedelta(days=1))
    for store, partition in ((mine, 0), (theirs, 1)):
        store.append([build_record("decision_only", "y", yesterday, None, now=DAY)],
                      partition)
    compressed, _ = mine.maintain(date(2026, 11, 23), retention_days=30,
                                  retention_bytes=10**9, partitions={0})
    assert [p.name for p in compressed] == ["2026-11-22-p0.jsonl.gz"]
    assert (tmp_path / "2026-11-22-p1.jsonl").exists()
