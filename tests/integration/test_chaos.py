"""Poison on every consumed topic while normal traffic flows: an oversized undecodable
message, an event with an empty request id and an event dated 1970. Every valid request
still gets its audit record, `audit verify` passes, the poison is in the DLQ (the
oversized original whole on the writer's disk) and the writer stays ready."""

import asyncio
import hashlib
import json
import signal
import subprocess
import time
from datetime import UTC, datetime

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from routemesh.contracts import decode_event, encode_event
from routemesh.contracts.topics import DLQ, LLM_OBSERVATIONS, ROUTE_DECISIONS
from routemesh.services.audit_writer.records import read_record
from routemesh.services.audit_writer.store import list_files, read_lines
from tests.integration.conftest import CLI, read_topic, start_service, wait_until_ready
from tests.services.audit_writer.helpers import decision, observation

pytestmark = [pytest.mark.broker, pytest.mark.slow]
OVERSIZED = b"\xff" + b"x" * 900_000


def empty_id(event) -> bytes:
    body = json.loads(encode_event(event))
    body["request_id"] = ""
    return json.dumps(body).encode()


async def test_poison_on_every_topic_loses_no_valid_record(settings, tmp_path):
    audit_dir, dead_dir = tmp_path / "audit", tmp_path / "dead-letters"
    writer, metrics, log = start_service(
        "audit-writer", settings, tmp_path, ROUTEMESH_AUDIT_DIR=str(audit_dir),
        ROUTEMESH_AUDIT_JOIN_WINDOW_S="2", ROUTEMESH_DEAD_LETTER_DIR=str(dead_dir))
    now = datetime.now(UTC)
    ancient = datetime(1970, 1, 1, tzinfo=UTC)
    topics = {"d": settings.topic(ROUTE_DECISIONS), "o": settings.topic(LLM_OBSERVATIONS)}
    valid = [f"ok-{i}" for i in range(300)] + ["from-1970"]
    try:
        await wait_until_ready(metrics, writer, log, timeout_s=60)
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                    max_request_size=2_000_000)
        await producer.start()
        try:
            for i, request_id in enumerate(valid[:-1]):
                await producer.send(topics["d"], encode_event(decision(request_id, now)),
                                    key=request_id.encode())
                await producer.send(topics["o"], encode_event(observation(request_id, now)),
                                    key=request_id.encode())
                if i == 100:
                    for which in ("d", "o"):
                        await producer.send(topics[which], OVERSIZED, key=b"poison")
                    await producer.send(topics["d"], empty_id(decision("x", now)), key=b"e")
                    await producer.send(topics["o"], empty_id(observation("x", now)), key=b"e")
                    await producer.send(topics["d"], encode_event(decision("from-1970", ancient)),
                                        key=b"from-1970")
                    await producer.send(topics["o"],
                                        encode_event(observation("from-1970", ancient)),
                                        key=b"from-1970")
            await producer.flush()
        finally:
            await producer.stop()

        def recorded() -> set[str]:
            return {read_record(line).request_id for f in list_files(audit_dir)
                    for _, line in read_lines(f)}

        deadline = time.monotonic() + 120
        while not set(valid) <= recorded():
            assert time.monotonic() < deadline, sorted(set(valid) - recorded())[:5]
            await asyncio.sleep(0.5)
        ready = httpx.get(f"http://127.0.0.1:{metrics}/readyz").json()
        letters = [decode_event(r.value) for r in await read_topic(settings,
                                                                   settings.topic(DLQ), 4)]
    finally:
        writer.send_signal(signal.SIGTERM)
        assert writer.wait(30) == 0, log.read_text()[-2000:]

    assert ready["ready"] is True, ready
    assert ready["checks"]["consumer:routemesh-audit-writer"]["ok"] is True
    verify = subprocess.run([*CLI, "audit", "verify", "--dir", str(audit_dir)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    records = {read_record(line).request_id: read_record(line)
               for f in list_files(audit_dir) for _, line in read_lines(f)}
    old = records["from-1970"]
    assert old.decision.occurred_at == ancient, "its own time is kept"
    assert old.day == old.received_at.date().isoformat() != "1970-01-01"

    oversized = [letter for letter in letters if letter.truncated]
    assert len(oversized) == 2, "one per topic"
    digest = hashlib.sha256(OVERSIZED).hexdigest()
    for letter in oversized:
        assert (letter.original_size, letter.original_sha256) == (len(OVERSIZED), digest)
        assert OVERSIZED.startswith(letter.original)
    assert (dead_dir / f"{digest}.bin").read_bytes() == OVERSIZED
    empties = [letter for letter in letters if not letter.truncated]
    assert {letter.error_kind for letter in empties} == {"invalid_event"}
    assert {letter.source_topic for letter in empties} == set(topics.values())
