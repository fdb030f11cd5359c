"""The consumer runtime's bookkeeping, without a broker: held offsets, dead letters that
the broker refuses. The same consumer runs against the real broker in
tests/integration/test_consumer.py."""

import asyncio
import time
from types import SimpleNamespace

from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError
from prometheus_client import CollectorRegistry

from routemesh.contracts import OutcomeReported, RouteDecided, encode_event
from routemesh.contracts.topics import ROUTE_DECISIONS
from routemesh.services.runtime.consumer import (
    Checkpoints,
    Delivery,
    EventConsumer,
    OffsetTracker,
    _Rebalance,
)
from routemesh.services.runtime.settings import ServiceSettings
from routemesh.services.runtime.telemetry import Readiness

POSITION = ("routemesh.route.decisions.v1", 0, 7)


def delivery(position) -> Delivery:
    return Delivery(OutcomeReported(request_id=f"r{position[2]}"), position)


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


class FakeLogs:
    """Partition logs as a test wants them: ends and the event id at each offset."""

    def __init__(self, ends, ids=None) -> None:
        self.ends, self.ids = ends, ids or {}

    async def probe(self, at):
        return {key: (self.ends[key], self.ids.get((key, offset))) for key, offset in at.items()}


def restored(offsets, anchors) -> Checkpoints:
    checkpoints = Checkpoints()
    checkpoints.restore(offsets, anchors)
    return checkpoints


async def test_a_log_that_ends_before_the_saved_offset_starts_a_new_epoch():
    checkpoints = restored({"t:0": 500, "t:1": 20}, {"t:0": "a", "t:1": "b"})
    logs = FakeLogs({("t", 0): 10, ("t", 1): 40}, {(("t", 1), 19): "b"})
    renewed = await checkpoints.verify({("t", 0), ("t", 1)}, logs)
    assert [key for key, _ in renewed] == [("t", 0)]
    assert "ends at 10" in renewed[0][1]
    assert checkpoints.offsets == {"t:1": 20}, "the same log keeps its place"
    tracker = OffsetTracker()
    fresh = checkpoints.fresh([delivery(("t", 0, 3)), delivery(("t", 1, 5))], tracker)
    assert [d.position for d in fresh] == [("t", 0, 3)], "the new log is read from its start"


async def test_a_log_made_again_past_the_saved_offset_is_told_by_its_event_ids():
    checkpoints = restored({"t:0": 5}, {"t:0": "the-old-event"})
    renewed = await checkpoints.verify({("t", 0)}, FakeLogs({("t", 0): 9},
                                                            {(("t", 0), 4): "another"}))
    assert [key for key, _ in renewed] == [("t", 0)]
    gone = restored({"t:0": 5}, {"t:0": "the-old-event"})
    assert await gone.verify({("t", 0)}, FakeLogs({("t", 0): 9})) == [], (
        "an event gone by retention proves nothing: the same log is assumed")


async def test_a_consume_loop_that_ends_fails_liveness():
    readiness = Readiness()
    unit = EventConsumer(ServiceSettings(), [ROUTE_DECISIONS], group_id="unit",
                         handler=NoHandler(), dead_letters=FlakyDeadLetters(0),
                         registry=CollectorRegistry(), service="unit", readiness=readiness)
    readiness.set_alive("consumer:unit", True)
    assert readiness.liveness()[0]

    async def crash():
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    unit._task = asyncio.create_task(crash())
    unit._task.add_done_callback(unit._ended)
    await asyncio.sleep(0.01)
    alive, checks = readiness.liveness()
    assert not alive
    assert checks["consumer:unit"]["detail"] == "the consume loop stopped by UnicodeDecodeError"


def test_a_stuck_event_loop_fails_liveness():
    readiness = Readiness(stall_s=5)
    assert readiness.liveness()[0], "alive before the loop first beats"
    readiness.beat()
    assert readiness.liveness()[0]
    readiness._beat -= 6
    alive, checks = readiness.liveness()
    assert not alive
    assert checks["event_loop"]["detail"].startswith("the event loop has not run for")


class Record(SimpleNamespace):
    """What the consume loop reads of an aiokafka ConsumerRecord."""


class ScriptedKafka:
    """The aiokafka consumer the loop drives, as a script of polls; every commit is
    written to the same journal as the handler's effects, so their order is seen."""

    def __init__(self, polls, journal: list, stop: asyncio.Event) -> None:
        self.polls, self.journal, self.stop = list(polls), journal, stop
        self.assigned = {tp for poll in self.polls for tp in poll}

    async def getmany(self, timeout_ms, max_records):
        if not self.polls:
            self.stop.set()
            return {}
        return self.polls.pop(0)

    async def commit(self, offsets):
        self.journal.append(("commit", {tp.partition: o for tp, o in offsets.items()}))

    def assignment(self):
        return self.assigned

    def highwater(self, tp):
        return None  # no lag to export


class JournalHandler:
    """Makes each event's effect durable within the call, except those it is told to
    hold, which it releases on the next call."""

    def __init__(self, journal: list, hold: set[str] = frozenset()) -> None:
        self.journal, self.hold, self.held = journal, hold, []

    async def handle(self, deliveries, offsets):
        for position in self.held:
            offsets.release(position)
            self.journal.append(("released", position[2]))
        self.held = []
        for d in deliveries:
            if d.event.request_id in self.hold:
                offsets.hold(d.position)
                self.held.append(d.position)
            else:
                self.journal.append(("effect", d.event.request_id))

    def revoked(self, partitions):
        pass


class JournalDeadLetters:
    def __init__(self, journal: list) -> None:
        self.journal = journal

    async def send(self, record, group, kind, error):
        self.journal.append(("dead_letter", record.offset, kind))


TOPIC = ServiceSettings().topic(ROUTE_DECISIONS)


def records(*values: bytes, start: int = 0) -> dict:
    return {TopicPartition(TOPIC, 0): [Record(offset=start + i, value=v, key=None, headers=())
                                       for i, v in enumerate(values)]}


def decided(request_id: str) -> bytes:
    return encode_event(RouteDecided(request_id=request_id, route_id="lite",
                                     target_model="m", reason="rule", layer="rules"))


async def run_script(polls, hold: set[str] = frozenset()) -> list:
    journal: list = []
    unit = EventConsumer(ServiceSettings(), [ROUTE_DECISIONS], group_id="unit",
                         handler=JournalHandler(journal, hold),
                         dead_letters=JournalDeadLetters(journal),
                         registry=CollectorRegistry(), service="unit")
    unit._consumer = ScriptedKafka(polls, journal, unit._stopping)
    await asyncio.wait_for(unit._run(), 10)
    return journal


async def test_a_poll_is_committed_only_after_the_handler_made_it_durable():
    journal = await run_script([records(decided("a"), decided("b")),
                                records(decided("c"), start=2)])
    assert journal == [("effect", "a"), ("effect", "b"), ("commit", {0: 2}),
                       ("effect", "c"), ("commit", {0: 3})]


async def test_a_held_event_keeps_the_commit_behind_it_until_released():
    journal = await run_script([records(decided("a"), decided("b"), decided("c")),
                                records(decided("d"), start=3)], hold={"b"})
    assert journal == [("effect", "a"), ("effect", "c"), ("commit", {0: 1}),
                       ("released", 1), ("effect", "d"), ("commit", {0: 4})]


async def test_an_undecodable_record_is_dead_lettered_and_the_poll_goes_on():
    journal = await run_script([records(decided("a"), b"\x00not an event", decided("c"))])
    assert journal == [("dead_letter", 1, "invalid_json"), ("effect", "a"), ("effect", "c"),
                       ("commit", {0: 3})]


async def test_an_event_seen_again_is_not_handed_over_twice():
    a = decided("a")
    journal = await run_script([records(a), records(a, start=0), records(a, start=1)])
    assert journal == [("effect", "a"), ("commit", {0: 1}), ("commit", {0: 2})]


async def test_a_revoke_waits_for_the_batch_in_hand():
    """A rebalance that revokes a partition while its batch is handled (the handler
    awaits its effect) drops the partition only after the batch is committed: the
    handler never saves state for a partition another instance already took over."""
    journal: list = []
    revoking: list[asyncio.Task] = []

    class Revoked(JournalHandler):
        async def handle(self, deliveries, offsets):
            if deliveries:
                revoking.append(asyncio.create_task(
                    _Rebalance(unit).on_partitions_revoked([TopicPartition(TOPIC, 0)])))
                for _ in range(5):
                    await asyncio.sleep(0)
            await super().handle(deliveries, offsets)

        def revoked(self, partitions):
            self.journal.append(("revoked", sorted(p for _, p in partitions)))

    unit = EventConsumer(ServiceSettings(), [ROUTE_DECISIONS], group_id="unit",
                         handler=Revoked(journal), dead_letters=JournalDeadLetters(journal),
                         registry=CollectorRegistry(), service="unit")
    unit._consumer = ScriptedKafka([records(decided("a"))], journal, unit._stopping)
    await asyncio.wait_for(unit._run(), 10)
    await asyncio.gather(*revoking)
    assert journal == [("effect", "a"), ("commit", {0: 1}), ("revoked", [0])]


async def test_a_poll_while_the_group_rejoins_takes_nothing_over_and_hands_nothing_on():
    """aiokafka names the revoked partitions as assigned until the new assignment comes:
    a poll in between neither takes them over again (their state would stay here once
    another instance owns them) nor hands on their records; after it, they are taken
    over afresh."""
    journal: list = []
    taken: list[set] = []

    class Rejoining(ScriptedKafka):
        class _subscription:
            reassignment_in_progress = True

        async def getmany(self, timeout_ms, max_records):
            if len(self.polls) == 1:
                self._subscription.reassignment_in_progress = False
            return await super().getmany(timeout_ms, max_records)

    async def on_assigned(partitions):
        taken.append(set(partitions))

    unit = EventConsumer(ServiceSettings(), [ROUTE_DECISIONS], group_id="unit",
                         handler=JournalHandler(journal), dead_letters=JournalDeadLetters(journal),
                         registry=CollectorRegistry(), service="unit", on_assigned=on_assigned)
    unit._consumer = Rejoining([records(decided("stale")), records(decided("a"), start=1)],
                               journal, unit._stopping)
    await asyncio.wait_for(unit._run(), 10)
    assert taken == [{(TOPIC, 0)}]
    assert ("effect", "stale") not in journal
    assert ("effect", "a") in journal


async def test_unread_is_unknown_until_fetched_and_leaves_with_its_partition():
    """A partition just assigned and not fetched yet must not read as nothing unread,
    and one revoked must not keep reporting (another instance reports it now); the
    subscription shows as the partitions held per topic."""
    registry = CollectorRegistry()
    unit = EventConsumer(ServiceSettings(), [ROUTE_DECISIONS], group_id="unit",
                         handler=JournalHandler([]), dead_letters=JournalDeadLetters([]),
                         registry=registry, service="unit")
    fetched, fresh = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    ends = {fetched: 5, fresh: None}

    class Assigned(ScriptedKafka):
        def highwater(self, tp):
            return ends[tp]

        async def position(self, tp):
            return 2

    unit._consumer = Assigned([], [], unit._stopping)
    unit._consumer.assigned = {fetched, fresh}
    await unit._export_lag()

    def unread(partition: int) -> float | None:
        return registry.get_sample_value("routemesh_consumer_unread_messages", {
            "group": "unit", "topic": TOPIC, "partition": str(partition)})

    def read(partition: int) -> float | None:
        return registry.get_sample_value("routemesh_consumer_read_offset", {
            "group": "unit", "topic": TOPIC, "partition": str(partition)})

    assert unread(0) == 3
    assert read(0) == 2
    assert unread(1) != unread(1), "NaN: not known yet"
    assert read(1) is None
    assert registry.get_sample_value("routemesh_consumer_assigned_partitions",
                                     {"group": "unit", "topic": TOPIC}) == 2
    unit._drop({(TOPIC, 0), (TOPIC, 1)})
    assert unread(0) is None
    assert unread(1) is None
    assert read(0) is None


async def test_partitions_whose_state_cannot_be_read_are_taken_over_again_later():
    """A changelog or a directory that fails while a partition's state is read hands
    nothing of the poll on and ends nothing: the loop goes back to the last commit and
    takes the partition over again at the next poll."""
    journal: list = []
    taken: list[set] = []

    class Rewindable(ScriptedKafka):
        async def committed(self, tp):
            return 0

        def seek(self, tp, offset):
            self.journal.append(("seek", offset))

    async def on_assigned(partitions):
        taken.append(set(partitions))
        if len(taken) == 1:
            raise KafkaConnectionError("changelog unreachable")

    unit = EventConsumer(ServiceSettings(), [ROUTE_DECISIONS], group_id="unit",
                         handler=JournalHandler(journal), dead_letters=JournalDeadLetters(journal),
                         registry=CollectorRegistry(), service="unit", on_assigned=on_assigned)
    unit._consumer = Rewindable([records(decided("a")), records(decided("a"))], journal,
                                unit._stopping)
    await asyncio.wait_for(unit._run(), 30)
    assert taken == [{(TOPIC, 0)}, {(TOPIC, 0)}]
    assert journal[0] == ("seek", 0)
    assert journal.count(("effect", "a")) == 1
    assert journal[-1] == ("commit", {0: 1})
