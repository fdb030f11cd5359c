"""The audit writer against a real broker: exactly one record per request under
redelivery and crashes, and poison pills in the DLQ."""

import asyncio
import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from routemesh.contracts import OutcomeReported, decode_event, encode_event
from routemesh.contracts.topics import DLQ, LLM_OBSERVATIONS, ROUTE_DECISIONS, ROUTE_OUTCOMES
from routemesh.services.audit_writer.store import list_files, read_lines
from tests.integration.conftest import CLI, cli_env, read_topic
from tests.services.audit_writer.helpers import decision, observation

pytestmark = pytest.mark.broker
REQUESTS = 20_000
WINDOW_S = 3


def start_writer(settings, audit_dir: Path, log: Path) -> subprocess.Popen:
    env = cli_env(
        settings,
        ROUTEMESH_AUDIT_DIR=str(audit_dir),
        ROUTEMESH_AUDIT_JOIN_WINDOW_S=str(WINDOW_S),
        ROUTEMESH_METRICS_PORT="0",
    )
    with log.open("ab") as out:
        return subprocess.Popen([*CLI, "serve", "audit-writer"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def read_records(audit_dir: Path) -> list[dict]:
    return [json.loads(line) for f in list_files(audit_dir) for _, line in read_lines(f)]


def plan(request_ids: list[str]) -> tuple[list[tuple[str, bytes, str]], dict[str, str]]:
    """Messages to publish, and what each request is: pair, decision_only or
    observation_only. Some pairs reordered, some events duplicated."""
    messages, kinds = [], {}
    for i, request_id in enumerate(request_ids):
        d, o = encode_event(decision(request_id)), encode_event(observation(request_id))
        kind = i % 20
        if kind == 0:
            kinds[request_id] = "decision_only"
            messages.append(("d", d, request_id))
        elif kind == 1:
            kinds[request_id] = "observation_only"
            messages.append(("o", o, request_id))
        else:
            kinds[request_id] = "pair"
            pair = [("d", d, request_id), ("o", o, request_id)]
            if kind == 2:
                pair.reverse()
            if kind == 3:
                pair.append(("d", d, request_id))
            if kind == 4:
                pair.append(("o", o, request_id))
            if kind in (5, 6):
                # What the caller said, once or redelivered: one outcome record either way.
                said = encode_event(OutcomeReported(request_id=request_id, completed=True))
                pair += [("u", said, request_id)] * (kind - 4)
            messages += pair
    return messages, kinds


async def publish(settings, messages, chunks: int, pause_s: float) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, linger_ms=5)
    await producer.start()
    topics = {"d": settings.topic(ROUTE_DECISIONS), "o": settings.topic(LLM_OBSERVATIONS),
              "u": settings.topic(ROUTE_OUTCOMES)}
    try:
        size = len(messages) // chunks + 1
        for start in range(0, len(messages), size):
            sends = [
                await producer.send(topics[which], value, key=key.encode())
                for which, value, key in messages[start : start + size]
            ]
            await asyncio.gather(*sends)
            await asyncio.sleep(pause_s)
    finally:
        await producer.stop()


class LineCounter:
    """Records on disk so far, reading only what was appended since the last call (the
    day files grow to tens of MB; re-reading them at every poll would be the bottleneck).
    Records are appended to plain files only; a file the writer compresses was counted
    before (a writer never compresses the file it writes)."""

    def __init__(self, audit_dir: Path) -> None:
        self.audit_dir = audit_dir
        self.offsets: dict[Path, int] = {}
        self.lines = 0

    def count(self) -> int:
        for file in list_files(self.audit_dir):
            if file.compressed:
                continue
            try:
                with file.path.open("rb") as handle:
                    handle.seek(self.offsets.get(file.path, 0))
                    chunk = handle.read()
            except FileNotFoundError:
                continue
            # Only whole lines: a torn tail is counted once its newline is written.
            whole = chunk[: chunk.rfind(b"\n") + 1]
            self.lines += whole.count(b"\n")
            self.offsets[file.path] = self.offsets.get(file.path, 0) + len(whole)
        return self.lines


async def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(poll_s)


def settled(audit_dir: Path, kinds: dict[str, str]) -> bool:
    """Every request has its one primary record and every half it was sent with."""
    records = read_records(audit_dir)
    primary = {r["request_id"] for r in records if r["join"] not in ("amendment", "outcome")}
    if len(primary) < len(kinds):
        return False
    if len({r["request_id"] for r in records if r["join"] == "outcome"}) < len(
            [i for i in range(len(kinds)) if i % 20 in (5, 6)]):
        return False
    decided = {r["request_id"] for r in records if r["decision"] is not None}
    observed = {r["request_id"] for r in records if r["observation"] is not None}
    return all(
        (request_id in decided) == (kind != "observation_only")
        and (request_id in observed) == (kind != "decision_only")
        for request_id, kind in kinds.items()
    )


@pytest.mark.slow
async def test_twenty_thousand_requests_three_crashes_exactly_one_record_each(
    settings, tmp_path
):
    """Crashes at points of progress (a share of the records on disk), never at a wall-clock
    time: on a busy machine the writer is slower, and the crashes wait for it."""
    request_ids = [f"req-{i:05d}" for i in range(REQUESTS)]
    messages, kinds = plan(request_ids)
    audit_dir, log = tmp_path / "audit", tmp_path / "writer.log"
    publishing = asyncio.create_task(publish(settings, messages, chunks=12, pause_s=0.5))
    counter = LineCounter(audit_dir)

    writer = start_writer(settings, audit_dir, log)
    kills = []
    try:
        for share in (0.2, 0.45, 0.7):
            # The moment the writer has put this share of the records on disk, it is
            # killed: usually between a batch's fsync and its offset commit, or with the
            # next batch half-read, so what it wrote is redelivered and must be skipped.
            await wait_for(lambda s=share: counter.count() >= s * REQUESTS, 240,
                           f"{share:.0%} of the records on disk")
            writer.send_signal(signal.SIGKILL)
            writer.wait(10)
            kills.append(counter.count())
            writer = start_writer(settings, audit_dir, log)
        await publishing
        # Late partners land as amendments; wait until every request has all it was sent.
        await wait_for(lambda: settled(audit_dir, kinds), 240, "every record", poll_s=1)
        writer.send_signal(signal.SIGTERM)
        assert writer.wait(15) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
        publishing.cancel()

    assert len(kills) == 3
    assert kills[-1] < REQUESTS, "the last crash happened before the work was done"

    verify = subprocess.run([*CLI, "audit", "verify", "--dir", str(audit_dir)],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stderr

    records = read_records(audit_dir)
    primary = [r for r in records if r["join"] not in ("amendment", "outcome")]
    assert len(primary) == REQUESTS
    assert {r["request_id"] for r in primary} == set(request_ids)
    has_observation = {r["request_id"] for r in records if r["observation"] is not None}
    has_decision = {r["request_id"] for r in records if r["decision"] is not None}
    for request_id, kind in kinds.items():
        assert (request_id in has_decision) == (kind != "observation_only"), request_id
        assert (request_id in has_observation) == (kind != "decision_only"), request_id
    # Amendments included: no event is written twice, whatever was redelivered.
    written = Counter(e for r in records for e in r["event_ids"])
    assert [e for e, n in written.items() if n > 1] == []
    said = [r["request_id"] for r in records if r["join"] == "outcome"]
    assert sorted(said) == sorted(r for i, r in enumerate(request_ids) if i % 20 in (5, 6)), \
        "each outcome once, through redeliveries and crashes"
    amendments = [r for r in records if r["join"] == "amendment"]
    assert all(len(r["event_ids"]) == 1 for r in amendments)
    assert len(amendments) <= sum(1 for k in kinds.values() if k == "pair")
    joins = {r["request_id"]: r["join"] for r in primary}
    assert all(joins[r] == "decision_only" for r, k in kinds.items() if k == "decision_only")
    assert all(joins[r] == "observation_only" for r, k in kinds.items() if k == "observation_only")


async def test_poison_pills_go_to_the_dlq_and_the_writer_keeps_going(settings, tmp_path):
    audit_dir = tmp_path / "audit"
    writer = start_writer(settings, audit_dir, tmp_path / "writer.log")
    unknown = b'{"type": "SomethingNew", "schema_version": "1.0", "request_id": "x"}'
    try:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
        await producer.start()
        decisions = settings.topic(ROUTE_DECISIONS)
        await producer.send_and_wait(decisions, b"\x00garbage", key=b"k")
        await producer.send_and_wait(decisions, unknown, key=b"k")
        await producer.send_and_wait(decisions, encode_event(decision("after")), key=b"k")
        await producer.send_and_wait(settings.topic(LLM_OBSERVATIONS),
                                     encode_event(observation("after")), key=b"k")
        await producer.stop()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            audit_dir.exists() and read_records(audit_dir)
        ):
            await asyncio.sleep(0.5)
    finally:
        writer.send_signal(signal.SIGTERM)
        writer.wait(15)
    (record,) = read_records(audit_dir)
    assert (record["request_id"], record["join"]) == ("after", "joined")
    letters = [decode_event(r.value) for r in await read_topic(settings, settings.topic(DLQ), 2)]
    assert {(letter.original, letter.error_kind) for letter in letters} == {
        (b"\x00garbage", "invalid_json"), (unknown, "unknown_type")
    }
    assert {letter.consumer_group for letter in letters} == {"routemesh-audit-writer"}
