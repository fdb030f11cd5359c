"""Audit writers in one consumer group: 1 instance against 2, in one run, on the embedded
broker with the registry's 6 partitions.

    python bench/scale_out.py [--pairs 20000]

For each instance count, fresh topics and a fresh audit directory; the writers run as
their own processes (`routemesh serve audit-writer`, fsync per batch) and have settled
their partitions before ``--pairs`` decision/observation pairs are published flat out.
Prints:

- events/s draining a backlog (published while the writers are SIGSTOPped), from their
  SIGCONT to the last record counted written (``routemesh_audit_records_written_total``),
  and the ratio of 2 instances to 1;
- the time a partition's state takes to move: from a SIGTERM to one of the two writers
  until the other has read the moved partitions' files into its dedup index (its log
  line "audit index read for assigned partitions", at the partitions' first records
  after the move, while a trickle of requests keeps coming), with the records it read;
- the trail's size per 1 M requests (the state that moves is the trail itself: a new
  owner reads its partition's files, nothing is kept beside them).

Everything shares the machine's cores: the broker, the publisher and the writers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from routemesh.contracts import CompletionObserved, RouteDecided
from routemesh.services.runtime.embedded_broker import EmbeddedBroker, free_port
from routemesh.services.runtime.kafka import create_topics
from routemesh.services.runtime.settings import ServiceSettings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stream_bench import publish_events

TOOK_OVER = "audit index read for assigned partitions"


def events(pairs: int, prefix: str = "req"):
    for i in range(pairs):
        request_id = f"{prefix}-{i}"
        yield RouteDecided(request_id=request_id, route_id="lite", target_model="small",
                           reason="semantic", layer="semantic", score=0.7,
                           prompt_sha256="a" * 64, decision_latency_ms=5.0)
        yield CompletionObserved(request_id=request_id, route_id="lite",
                                 target_model="small", upstream_status=200,
                                 duration_ms=250.0, total_tokens=42)


def metric(port: int, name: str) -> tuple[float, int] | None:
    """(sum, number of series) of a metric, or None while the writer does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    samples = [s for f in text_string_to_metric_families(text) if f.name == name
               for s in f.samples if s.name == name or s.name == f"{name}_total"]
    return sum(s.value for s in samples), len(samples)


class Writers:
    def __init__(self, settings: ServiceSettings, work: Path, count: int) -> None:
        self.audit_dir = work / "audit"
        self.running: list[tuple[subprocess.Popen[bytes], int, Path]] = []
        for n in range(count):
            port, log = free_port(), work / f"writer-{n}.log"
            env = dict(os.environ,
                       ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
                       ROUTEMESH_TOPIC_PREFIX=settings.topic_prefix,
                       ROUTEMESH_KAFKA_IDEMPOTENT_PRODUCER="false",
                       ROUTEMESH_AUDIT_DIR=str(self.audit_dir), ROUTEMESH_METRICS_PORT=str(port),
                       ROUTEMESH_METRICS_HOST="127.0.0.1", ROUTEMESH_INSTANCE_ID=f"w{n}")
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "routemesh.services.cli.main", "serve",
                     "audit-writer"], env=env, stdout=out, stderr=subprocess.STDOUT)
            self.running.append((process, port, log))

    async def settled(self, partitions: int) -> None:
        """Until the group's instances together read every partition of their topics."""
        while True:
            found = [metric(port, "routemesh_consumer_unread_messages")
                     for _, port, _ in self.running]
            if all(found) and sum(f[1] for f in found if f) == partitions:
                return
            await asyncio.sleep(0.2)

    async def written(self, count: int) -> None:
        while True:
            found = [metric(port, "routemesh_audit_records_written")
                     for _, port, _ in self.running]
            if sum(f[0] for f in found if f) >= count:
                return
            await asyncio.sleep(0.05)

    def signal(self, signum: int) -> None:
        for process, _, _ in self.running:
            process.send_signal(signum)

    def stop(self) -> None:
        for process, _, _ in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _, _ in self.running:
            process.wait(30)


def took_over(log: Path, after: float) -> tuple[float, int, float] | None:
    """(when, records read, seconds reading) of the writer's first takeover logged after
    ``after``."""
    for line in log.read_text().splitlines():
        if TOOK_OVER in line:
            entry = json.loads(line)
            when = datetime.fromisoformat(entry["ts"]).timestamp()
            if when > after:
                return when, entry["records"], entry["seconds"]
    return None


async def run(broker: EmbeddedBroker, count: int, pairs: int) -> dict[str, float]:
    settings = ServiceSettings(kafka_bootstrap_servers=broker.bootstrap,
                               kafka_idempotent_producer=False,
                               topic_prefix=f"b{uuid.uuid4().hex[:8]}.")
    await create_topics(settings)
    work = Path(tempfile.mkdtemp(prefix=f"routemesh-bench-scale-{count}-"))
    writers = Writers(settings, work, count)
    figures: dict[str, float] = {}
    try:
        await writers.settled(3 * 6)
        # The backlog is published while the writers are stopped (for less than their
        # session timeout, so the group stands), then drained: the writers' pace, not
        # the publisher's, which shares the cores.
        writers.signal(signal.SIGSTOP)
        await publish_events(settings, events(pairs))
        started = time.perf_counter()
        writers.signal(signal.SIGCONT)
        await writers.written(pairs)
        figures["events_per_s"] = 2 * pairs / (time.perf_counter() - started)
        figures["trail_bytes_per_request"] = sum(
            p.stat().st_size for p in writers.audit_dir.iterdir()) / pairs
        if count > 1:
            leaving, _, _ = writers.running[1]
            stopped_at = time.time()
            leaving.send_signal(signal.SIGTERM)
            staying = writers.running[0][2]
            # A partition is taken over at its first records after the move: traffic
            # keeps coming, as it would.
            n = 0
            while (moved := took_over(staying, stopped_at)) is None:
                await publish_events(settings, events(50, f"after-{n}"))
                n += 1
                await asyncio.sleep(0.05)
            figures["move_s"] = moved[0] - stopped_at
            figures["moved_records"], figures["read_s"] = moved[1], moved[2]
    finally:
        writers.stop()
    return figures


async def main_async(broker: EmbeddedBroker, pairs: int) -> None:
    one = await run(broker, 1, pairs)
    two = await run(broker, 2, pairs)
    print(f"{pairs} requests ({2 * pairs} events) drained as a backlog, 6 partitions, "
          f"{os.cpu_count()} cores:")
    print(f"  1 audit writer : {one['events_per_s']:8.0f} events/s")
    print(f"  2 audit writers: {two['events_per_s']:8.0f} events/s")
    print(f"  ratio 2 / 1: {two['events_per_s'] / one['events_per_s']:.2f}")
    print(f"a partition's state moving (SIGTERM of one of two writers until the other has "
          f"read the moved partitions' files): {two['move_s']:.2f} s, of which reading "
          f"{two['moved_records']:.0f} records {two['read_s']:.2f} s (the rest is the "
          f"group's rebalance)")
    per_million = one["trail_bytes_per_request"] * 1_000_000 / 1024**3
    print(f"trail per 1 M requests (the state that moves with a partition): "
          f"{per_million:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    broker = EmbeddedBroker(free_port())
    broker.start()
    try:
        asyncio.run(main_async(broker, parser.parse_args().pairs))
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
