"""End-to-end audit writer figures against the embedded broker.

    python bench/audit.py [--pairs 25000] [--rate 1000] [--seconds 20]

One run, the writer as its own process (`routemesh serve audit-writer`, fsync per
batch). Prints:

- sustained throughput: events/s from the first publish to the last fsynced line,
  for ``--pairs`` decision/observation pairs published as fast as possible;
- event-to-disk latency p50/p99 at a fixed ``--rate`` events/s: from publishing a
  request's observation to its record being readable on disk (files polled every 5 ms);
- the same two figures for a consume-only baseline (a plain aiokafka consumer in its
  own process, like the writer, that writes nothing) and the ratio against it.

Targets: >= 5,000 events/s sustained; p99 <= 1 s at 1,000 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from routemesh.contracts import CompletionObserved, RouteDecided, encode_event
from routemesh.contracts.topics import LLM_OBSERVATIONS, ROUTE_DECISIONS
from routemesh.services.runtime.embedded_broker import EmbeddedBroker, free_port
from routemesh.services.runtime.stats import Percentiles

D, OBS = ROUTE_DECISIONS.name(), LLM_OBSERVATIONS.name()


def pair(request_id: str) -> tuple[bytes, bytes]:
    decision = RouteDecided(request_id=request_id, route_id="lite", target_model="small",
                            reason="semantic", layer="semantic", score=0.7,
                            prompt_sha256="a" * 64, decision_latency_ms=5.0)
    observation = CompletionObserved(request_id=request_id, route_id="lite",
                                     target_model="small", upstream_status=200,
                                     duration_ms=250.0, total_tokens=42)
    return encode_event(decision), encode_event(observation)


class Tail:
    """Follows the audit files and notes when each request's record became readable."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.offsets: dict[Path, int] = {}
        self.seen: dict[str, float] = {}

    def poll(self) -> None:
        now = time.time()
        for path in sorted(self.directory.glob("*.jsonl")):
            with path.open("rb") as handle:
                handle.seek(self.offsets.get(path, 0))
                data = handle.read()
            complete = data[: data.rfind(b"\n") + 1]
            self.offsets[path] = self.offsets.get(path, 0) + len(complete)
            for line in complete.splitlines():
                self.seen.setdefault(json.loads(line)["request_id"], now)

    async def wait_for(self, count: int, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while len(self.seen) < count:
            if time.time() > deadline:
                raise TimeoutError(f"only {len(self.seen)} of {count} records after {timeout_s}s")
            self.poll()
            await asyncio.sleep(0.005)


async def produce(bootstrap: str, prefix: str, pairs: int, rate: float | None) -> dict[str, float]:
    """Publish pairs (as fast as possible, or at ``rate`` events/s); return when each
    request's observation was sent."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
    await producer.start()
    sent: dict[str, float] = {}
    start = time.time()
    pending = []
    for i in range(pairs):
        request_id = f"{prefix}-{i}"
        decision, observation = pair(request_id)
        if rate is not None:
            due = start + (2 * i) / rate
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
        pending.append(await producer.send(D, decision, key=request_id.encode()))
        pending.append(await producer.send(OBS, observation, key=request_id.encode()))
        sent[request_id] = time.time()
    await asyncio.gather(*pending)
    await producer.stop()
    return sent


async def consume_only(bootstrap: str, prefix: str, pairs: int, out: Path) -> None:
    """The baseline reader, run as its own process like the writer: note when each
    request's observation arrived, write nothing else."""
    consumer = AIOKafkaConsumer(D, OBS, bootstrap_servers=bootstrap, group_id=f"bench-{prefix}",
                                auto_offset_reset="latest", enable_auto_commit=False)
    await consumer.start()
    seen: dict[str, float] = {}
    while len(seen) < pairs:
        # The writer's own poll settings (ROUTEMESH_AUDIT_POLL_MS=20, 2000 records).
        batch = await consumer.getmany(timeout_ms=20, max_records=2000)
        now = time.time()
        for tp, records in batch.items():
            if tp.topic == OBS:
                for record in records:
                    key = record.key.decode()
                    if key.startswith(f"{prefix}-"):
                        seen.setdefault(key, now)
    await consumer.stop()
    out.write_text(json.dumps(seen))


async def baseline(bootstrap: str, prefix: str, pairs: int, rate: float | None, work: Path):
    """(events/s, latencies ms) of the consume-only reader on the same traffic."""
    out = work / f"{prefix}.json"
    reader = subprocess.Popen(
        [sys.executable, __file__, "--consume-only", prefix, str(pairs), str(out), bootstrap]
    )
    await asyncio.sleep(8)  # let it join its group before the traffic starts
    started = time.time()
    sent = await produce(bootstrap, prefix, pairs, rate)
    await asyncio.to_thread(reader.wait, 300)
    seen = json.loads(out.read_text())
    return 2 * pairs / (max(seen.values()) - started), [(seen[r] - sent[r]) * 1000 for r in sent]


async def through_writer(bootstrap: str, tail: Tail, prefix: str, pairs: int, rate):
    before = len(tail.seen)
    started = time.time()
    # Follow the files while publishing, so a record's arrival time is when it landed.
    watching = asyncio.create_task(tail.wait_for(before + pairs, 300))
    sent = await produce(bootstrap, prefix, pairs, rate)
    await watching
    elapsed = max(tail.seen[r] for r in sent) - started
    return 2 * pairs / elapsed, [(tail.seen[r] - sent[r]) * 1000 for r in sent]


async def main_async(args, broker: EmbeddedBroker) -> None:
    work = Path(tempfile.mkdtemp(prefix="routemesh-bench-audit-"))
    env = dict(os.environ, ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
               ROUTEMESH_KAFKA_IDEMPOTENT_PRODUCER="false", ROUTEMESH_AUDIT_DIR=str(work),
               ROUTEMESH_METRICS_PORT="0", ROUTEMESH_AUDIT_POLL_MS="20")
    writer = subprocess.Popen(
        [sys.executable, "-m", "routemesh.services.cli.main", "serve", "audit-writer"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        tail = Tail(work)
        await through_writer(broker.bootstrap, tail, "warmup", 10, None)
        steady_pairs = int(args.rate * args.seconds / 2)
        w_rate, _ = await through_writer(broker.bootstrap, tail, "burst", args.pairs, None)
        _, w_lat = await through_writer(broker.bootstrap, tail, "steady", steady_pairs, args.rate)
        b_rate, _ = await baseline(broker.bootstrap, "b-burst", args.pairs, None, work)
        _, b_lat = await baseline(broker.bootstrap, "b-steady", steady_pairs, args.rate, work)
    finally:
        writer.terminate()
        writer.wait(15)

    print(f"sustained, {args.pairs} pairs ({2 * args.pairs} events) published flat out:")
    print(f"  audit writer (publish -> fsynced line): {w_rate:8.0f} events/s "
          f"({w_rate / 2:.0f} records/s)")
    print(f"  consume-only baseline:                  {b_rate:8.0f} events/s")
    print(f"  ratio writer / baseline: {w_rate / b_rate:.2f}")
    print(f"latency at a fixed {args.rate:.0f} events/s for {args.seconds:.0f} s "
          f"({steady_pairs} pairs), ms:")
    writer_ms, baseline_ms = Percentiles.of(w_lat), Percentiles.of(b_lat)
    print(f"  audit writer event-to-disk: p50 {writer_ms.p50:7.1f}  p99 {writer_ms.p99:7.1f}")
    print(f"  consume-only baseline:      p50 {baseline_ms.p50:7.1f}  p99 {baseline_ms.p99:7.1f}")
    print(f"targets: >= 5,000 events/s: {'met' if w_rate >= 5000 else 'MISSED'}; "
          f"p99 <= 1 s: {'met' if writer_ms.p99 <= 1000 else 'MISSED'}")


def main() -> None:
    if sys.argv[1:2] == ["--consume-only"]:
        prefix, pairs, out, bootstrap = sys.argv[2:6]
        asyncio.run(consume_only(bootstrap, prefix, int(pairs), Path(out)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=25_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    broker = EmbeddedBroker(free_port())
    broker.start()
    try:
        asyncio.run(main_async(parser.parse_args(), broker))
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
