"""The writer's handler when the disk fails: nothing is acknowledged that is not on disk."""

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from routemesh.services.audit_writer.service import AuditWriter, AuditWriterSettings
from routemesh.services.runtime.consumer import Delivery, OffsetTracker
from routemesh.services.runtime.kafka import RetryableError
from routemesh.services.runtime.telemetry import Readiness
from tests.services.audit_writer.helpers import decision, observation

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
    await audit.handle(pair("written", 0), offsets)

    def disk_full(records):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit.store, "append", disk_full)
    with pytest.raises(RetryableError):
        await audit.handle(pair("lost", 1), offsets)
    assert audit.store.state("written") is not None, "the index was rebuilt from the files"
    assert audit.store.state("lost") is None, "so its redelivery is written, not skipped"
    monkeypatch.undo()
    audit.revoked({(D, 0), (O, 0)})
    await audit.handle(pair("lost", 1), offsets)
    assert audit.store.state("lost").has_observation
    audit.store.close()
