"""The consumer runtime's bookkeeping, without a broker: held offsets, dead letters that
the broker refuses. The same consumer runs against the real broker in
tests/integration/test_consumer.py."""

import asyncio
import time

from prometheus_client import CollectorRegistry

from routemesh.contracts.topics import ROUTE_DECISIONS
from routemesh.services.runtime.consumer import EventConsumer, OffsetTracker
from routemesh.services.runtime.settings import ServiceSettings

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


class NoHandler:
    async def handle(self, deliveries, offsets):
        pass

    def revoked(self, partitions):
        pass


def consumer(dead_letters) -> EventConsumer:
    return EventConsumer(ServiceSettings(), [ROUTE_DECISIONS], group_id="unit",
                         handler=NoHandler(), dead_letters=dead_letters,
                         registry=CollectorRegistry(), service="unit")


def test_the_commit_stops_at_the_oldest_held_offset():
    tracker = OffsetTracker()
    for offset in range(5, 10):
        tracker.consumed(("t", 0, offset))
    tracker.hold(("t", 0, 6))
    tracker.hold(("t", 0, 8))
    assert tracker.to_commit() == {("t", 0): 6}
    tracker.release(("t", 0, 6))
    assert tracker.to_commit() == {("t", 0): 8}
    assert tracker.is_held(("t", 0, 8))
    assert not tracker.is_held(("t", 0, 6))
    tracker.release(("t", 0, 8))
    tracker.committed({("t", 0): 10})
    assert tracker.to_commit() == {}
    assert tracker.held_count() == 0


def test_a_forgotten_partition_starts_again_from_nothing():
    tracker = OffsetTracker()
    tracker.consumed(("t", 1, 3))
    tracker.hold(("t", 1, 3))
    tracker.forget({("t", 1)})
    assert tracker.to_commit() == {}
    assert tracker.held_count() == 0


async def test_a_refused_dead_letter_is_retried_and_its_offset_held_until_sent():
    letters = FlakyDeadLetters(failures=2)
    unit = consumer(letters)
    unit.offsets.consumed(POSITION)
    await asyncio.wait_for(unit._dead_letter(object(), POSITION, "invalid_json", "x"), 10)
    assert letters.sent == 1
    assert unit.offsets.to_commit() == {POSITION[:2]: 8}


async def test_stopping_mid_retry_keeps_the_offset_held():
    unit = consumer(FlakyDeadLetters(failures=10**6))
    unit.offsets.consumed(POSITION)
    unit._stopping.set()
    await unit._dead_letter(object(), POSITION, "invalid_json", "x")
    assert unit.offsets.to_commit() == {POSITION[:2]: 7}, "never commits past it"


async def test_a_consumer_that_stops_moving_is_not_ready():
    unit = consumer(FlakyDeadLetters(failures=0))
    assert unit.progress() == (False, "not running")
    unit._task = asyncio.create_task(asyncio.sleep(3600))
    unit.last_progress = time.monotonic()
    assert unit.progress() == (True, "")
    unit.last_progress -= unit.stall_after_s + 1
    ok, why = unit.progress()
    assert not ok
    assert why.startswith("no poll handled for")
    unit._task.cancel()

    async def crash():
        raise ConnectionError("gone")

    unit._task = asyncio.create_task(crash())
    await asyncio.sleep(0)
    assert unit.progress() == (False, "stopped by ConnectionError")
