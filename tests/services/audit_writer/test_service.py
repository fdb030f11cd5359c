"""The writer's dead-letter path when the broker refuses the dead letter."""

import asyncio
from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from routemesh.contracts import EventDecodeError
from routemesh.services.audit_writer.service import AuditWriter, AuditWriterSettings
from routemesh.services.runtime.telemetry import Readiness

POSITION = ("routemesh.route.decisions.v1", 0, 7)


class FlakyDeadLetters:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sent = 0

    async def send(self, record, group, kind, error):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("broker unreachable")
        self.sent += 1


def writer(tmp_path, dead_letters) -> AuditWriter:
    ctx = SimpleNamespace(registry=CollectorRegistry(), readiness=Readiness(),
                          dead_letters=dead_letters)
    return AuditWriter(ctx, AuditWriterSettings(audit_dir=tmp_path))


async def test_a_refused_dead_letter_is_retried_and_its_offset_held_until_sent(tmp_path):
    letters = FlakyDeadLetters(failures=2)
    audit = writer(tmp_path, letters)
    audit.tracker.consumed(POSITION)
    await asyncio.wait_for(
        audit._dead_letter(object(), POSITION, EventDecodeError("invalid_json", "x")), 10)
    assert letters.sent == 1
    assert audit.tracker.to_commit() == {POSITION[:2]: 8}


async def test_stopping_mid_retry_keeps_the_offset_held(tmp_path):
    audit = writer(tmp_path, FlakyDeadLetters(failures=10**6))
    audit.tracker.consumed(POSITION)
    audit._stopping.set()
    await audit._dead_letter(object(), POSITION, EventDecodeError("invalid_json", "x"))
    assert audit.tracker.to_commit() == {POSITION[:2]: 7}, "never commits past it"
