"""Consumers in one consumer group: 1 instance against 2, in one run, on the embedded
broker with the registry's 6 partitions; the audit writer, the scorer and the drift
detector (their state on their changelog topics), and the replay worker.

    python bench/scale_out.py [--requests 20000] [--replays 12]
                              [--service audit-writer|scorer|drift-detector|replay-worker]

For each service and instance count, fresh topics (and a fresh audit directory); the
instances run as their own processes (`routemesh serve ...`) and have settled their
partitions before the requests' events are published: a decision and an observation
each, and for the scorer an outcome too; for the drift detector over the 7 routes and 5
models of `multi-route.yaml`, so that there are subjects to share. Prints:

- events/s draining a backlog (published while the instances are SIGSTOPped), from
  their SIGCONT until every event is counted delivered and everything is committed
  (which each does only once its effect is durable; for the drift detector, the copies
  it re-keyed by subject onto its own topic too), and the ratio of 2 instances to 1;
- the time a partition's state takes to move: from a SIGTERM to one of the two until
  the other has taken over the moved partitions' state (its log line, at its first
  poll after the rebalance, while a trickle of requests keeps coming), with what it
  read;
- the state's size per 1 M requests: the audit trail (the state that moves is the trail
  itself), or what the instances wrote on their changelog and what of it compaction
  keeps (the newest record of each key).

The replay workers drain a backlog of replay requests of the shipped lite-deep set
(each through the config and the baselines, on the encoder) and print replays/s; their
state is the answers on the results topic, read again on assignment, and the reports in
the shared directory, so nothing else moves.

Everything shares the machine's cores: the broker, the publisher and the instances.
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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from routemesh.contracts import (
    CompletionObserved,
    OutcomeReported,
    ReplayRequested,
    RouteDecided,
)
from routemesh.contracts.topics import DRIFT_CHANGELOG, SCORER_CHANGELOG, Topic
from routemesh.services.runtime.consumer import read_records
from routemesh.services.runtime.embedded_broker import EmbeddedBroker, free_port
from routemesh.services.runtime.kafka import EventProducer, create_topics
from routemesh.services.runtime.settings import ServiceSettings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stream_bench import publish_events

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Profile:
    """What differs between the services benched."""

    service: str
    # The log line of a partition's state taken over, and its field of what was read.
    took_over: str
    read_field: str
    outcomes: bool
    env: dict[str, str]
    changelog: Topic | None = None
    # Events delivered per request, over every group the instances read in.
    delivered: int = 2
    # The (route, model) pairs the requests go round.
    routes: tuple[tuple[str, str], ...] = (("lite", "small"),)


EXAMPLES = ROOT / "deploy/examples"
MULTI_ROUTE = EXAMPLES / "multi-route.yaml"
PROFILES = {
    "audit-writer": Profile("audit-writer", "audit index read for assigned partitions",
                            "records", False, {}),
    "scorer": Profile("scorer", "scorer state restored from the changelog", "pending", True,
                      {"ROUTEMESH_SCORER_STATE_STORE": "changelog",
                       "ROUTEMESH_ROUTER_CONFIG": str(ROOT / "deploy/examples/lite-deep.yaml"),
                       "ROUTEMESH_SCORER_PUBLISH_INTERVAL_S": "3600",
                       # Saved (and so committed) every second rather than every 5: the
                       # drain's end is its last commit.
                       "ROUTEMESH_SCORER_SNAPSHOT_INTERVAL_S": "1"},
                      SCORER_CHANGELOG, delivered=3),
    # A decision feeds its route and all routing, an observation its route and its
    # model: each event read comes again as two copies keyed by subject.
    "drift-detector": Profile(
        "drift-detector", "drift state restored from the changelog", "subjects", False,
        {"ROUTEMESH_DRIFT_STATE_STORE": "changelog",
         "ROUTEMESH_ROUTER_CONFIG": str(MULTI_ROUTE)},
        DRIFT_CHANGELOG, delivered=6,
        routes=(("coding", "code-model"), ("math", "reasoning-model"),
                ("writing", "writer-model"), ("extraction", "small-model"),
                ("chat", "small-model"), ("support", "support-model"))),
    "replay-worker": Profile(
        "replay-worker", "", "", False,
        {"ROUTEMESH_ROUTER_CONFIG": str(EXAMPLES / "lite-deep.yaml"),
         "ROUTEMESH_REPLAY_CONFIG_DIR": str(EXAMPLES),
         "ROUTEMESH_REPLAY_INPUT_DIR": str(EXAMPLES)}),
}


def events(requests: int, profile: Profile, prefix: str = "req"):
    for i in range(requests):
        request_id = f"{prefix}-{i}"
        route, model = profile.routes[i % len(profile.routes)]
        yield RouteDecided(request_id=request_id, route_id=route, target_model=model,
                           reason="semantic", layer="semantic", score=0.7,
                           prompt_sha256="a" * 64, decision_latency_ms=5.0)
        yield CompletionObserved(request_id=request_id, route_id=route,
                                 target_model=model, upstream_status=200,
                                 duration_ms=250.0, total_tokens=42)
        if profile.outcomes:
            yield OutcomeReported(request_id=request_id, expected_route=route,
                                  correct_route=True)


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


class Instances:
    def __init__(self, settings: ServiceSettings, work: Path, count: int,
                 profile: Profile) -> None:
        self.audit_dir = work / "audit"
        self.running: list[tuple[subprocess.Popen[bytes], int, Path]] = []
        for n in range(count):
            port, log = free_port(), work / f"{profile.service}-{n}.log"
            env = dict(os.environ, **profile.env,
                       ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS=settings.kafka_bootstrap_servers,
                       ROUTEMESH_TOPIC_PREFIX=settings.topic_prefix,
                       ROUTEMESH_KAFKA_IDEMPOTENT_PRODUCER="false",
                       ROUTEMESH_AUDIT_DIR=str(self.audit_dir),
                       ROUTEMESH_SCORER_STATE_DIR=str(work / f"scorer-{n}"),
                       ROUTEMESH_DRIFT_STATE_DIR=str(work / f"drift-{n}"),
                       ROUTEMESH_REPLAY_REPORT_DIR=str(work / "reports"),
                       ROUTEMESH_METRICS_PORT=str(port),
                       ROUTEMESH_METRICS_HOST="127.0.0.1", ROUTEMESH_INSTANCE_ID=f"i{n}")
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "routemesh.services.cli.main", "serve",
                     profile.service], env=env, stdout=out, stderr=subprocess.STDOUT)
            self.running.append((process, port, log))

    async def settled(self, partitions: int) -> None:
        """Until the group's instances together read every partition of their topics
        (in each group they read in)."""
        while True:
            found = [metric(port, "routemesh_consumer_unread_messages")
                     for _, port, _ in self.running]
            if all(found) and sum(f[1] for f in found if f) == partitions:
                return
            await asyncio.sleep(0.2)

    async def drained(self, count: int) -> None:
        """Until ``count`` events are delivered and nothing is left uncommitted."""
        while True:
            delivered = [metric(port, "routemesh_consumer_events")
                         for _, port, _ in self.running]
            lag = [metric(port, "routemesh_consumer_lag_messages")
                   for _, port, _ in self.running]
            if sum(f[0] for f in delivered if f) >= count and \
                    sum(f[0] for f in lag if f) == 0:
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


def took_over(log: Path, after: float, profile: Profile) -> tuple[float, int, float] | None:
    """(when, what was read, seconds reading) of the instance's first takeover logged
    after ``after``."""
    for line in log.read_text().splitlines():
        if profile.took_over in line:
            entry = json.loads(line)
            when = datetime.fromisoformat(entry["ts"]).timestamp()
            if when > after:
                return when, entry[profile.read_field], entry["seconds"]
    return None


async def changelog_bytes(settings: ServiceSettings, changelog: Topic) -> tuple[int, int]:
    """(bytes written on the changelog, bytes of the newest record of each key)."""
    written, newest = 0, {}
    async for record in read_records(settings, settings.topic(changelog),
                                     from_beginning=True, idle_s=2.0):
        size = len(record.key or b"") + len(record.value or b"")
        written += size
        newest[(record.partition, record.key)] = size if record.value is not None else 0
    return written, sum(newest.values())


async def run(broker: EmbeddedBroker, count: int, requests: int, profile: Profile
              ) -> dict[str, float]:
    settings = ServiceSettings(kafka_bootstrap_servers=broker.bootstrap,
                               kafka_idempotent_producer=False,
                               topic_prefix=f"b{uuid.uuid4().hex[:8]}.")
    await create_topics(settings)
    work = Path(tempfile.mkdtemp(prefix=f"routemesh-bench-scale-{count}-"))
    instances = Instances(settings, work, count, profile)
    per_request = 3 if profile.outcomes else 2
    figures: dict[str, float] = {}
    try:
        # Every partition of the topics read, in every group: 3 topics of 6 partitions
        # (the writers and the scorers), or 2 and the subjects' 6 (the detectors).
        await instances.settled(3 * 6)
        # The backlog is published while the instances are stopped (for less than their
        # session timeout, so the group stands), then drained: the instances' pace, not
        # the publisher's, which shares the cores.
        instances.signal(signal.SIGSTOP)
        await publish_events(settings, events(requests, profile))
        started = time.perf_counter()
        instances.signal(signal.SIGCONT)
        await instances.drained(profile.delivered * requests)
        figures["events_per_s"] = per_request * requests / (time.perf_counter() - started)
        if profile.changelog is None:
            figures["state_bytes_per_request"] = sum(
                p.stat().st_size for p in instances.audit_dir.iterdir()) / requests
        else:
            written, kept = await changelog_bytes(settings, profile.changelog)
            figures["state_bytes_per_request"] = written / requests
            figures["compacted_bytes_per_request"] = kept / requests
        if count > 1:
            leaving, _, _ = instances.running[1]
            stopped_at = time.time()
            leaving.send_signal(signal.SIGTERM)
            staying = instances.running[0][2]
            # Traffic keeps coming while the partitions move, as it would.
            n = 0
            while (moved := took_over(staying, stopped_at, profile)) is None:
                await publish_events(settings, events(50, profile, f"after-{n}"))
                n += 1
                await asyncio.sleep(0.05)
            figures["move_s"] = moved[0] - stopped_at
            figures["moved"], figures["read_s"] = moved[1], moved[2]
    finally:
        instances.stop()
    return figures


async def replays_per_s(broker: EmbeddedBroker, count: int, replays: int) -> float:
    """Replays/s of ``count`` workers draining ``replays`` requests, from their SIGCONT
    until every one is answered (the first replay of each worker loads the encoder)."""
    settings = ServiceSettings(kafka_bootstrap_servers=broker.bootstrap,
                               kafka_idempotent_producer=False,
                               topic_prefix=f"b{uuid.uuid4().hex[:8]}.")
    await create_topics(settings)
    work = Path(tempfile.mkdtemp(prefix=f"routemesh-bench-scale-{count}-"))
    instances = Instances(settings, work, count, PROFILES["replay-worker"])
    producer = EventProducer(settings, "bench")
    try:
        await instances.settled(6)
        instances.signal(signal.SIGSTOP)
        await producer.start()
        for n in range(replays):
            await producer.publish(ReplayRequested(
                replay_id=f"bench-{n:03d}", dataset="lite-deep.eval.jsonl",
                config="lite-deep.yaml"))
        started = time.perf_counter()
        instances.signal(signal.SIGCONT)
        while sum(found[0] for _, port, _ in instances.running
                  if (found := metric(port, "routemesh_replay_worker_replays"))) < replays:
            await asyncio.sleep(0.2)
        return replays / (time.perf_counter() - started)
    finally:
        await producer.stop()
        instances.stop()


async def main_async(broker: EmbeddedBroker, requests: int, profile: Profile,
                     replays: int) -> None:
    if profile.service == "replay-worker":
        alone = await replays_per_s(broker, 1, replays)
        paired = await replays_per_s(broker, 2, replays)
        print(f"replay-worker: {replays} replays of lite-deep.eval.jsonl drained as a "
              f"backlog, 6 partitions, {os.cpu_count()} cores:")
        print(f"  1 instance : {alone:8.3f} replays/s")
        print(f"  2 instances: {paired:8.3f} replays/s")
        print(f"  ratio 2 / 1: {paired / alone:.2f}")
        return
    one = await run(broker, 1, requests, profile)
    two = await run(broker, 2, requests, profile)
    name = profile.service
    print(f"{name}: {requests} requests drained as a backlog, 6 partitions, "
          f"{os.cpu_count()} cores:")
    print(f"  1 instance : {one['events_per_s']:8.0f} events/s")
    print(f"  2 instances: {two['events_per_s']:8.0f} events/s")
    print(f"  ratio 2 / 1: {two['events_per_s'] / one['events_per_s']:.2f}")
    print(f"  a partition's state moving (SIGTERM of one of two until the other has taken "
          f"over the moved partitions' state): {two['move_s']:.2f} s, of which reading "
          f"{two['moved']:.0f} {profile.read_field} {two['read_s']:.2f} s (the rest is the "
          f"group's rebalance)")
    per_million = one["state_bytes_per_request"] * 1_000_000 / 1024**3
    if profile.changelog is None:
        print(f"  trail per 1 M requests (the state that moves with a partition): "
              f"{per_million:.2f} GiB")
    else:
        kept = one["compacted_bytes_per_request"] * 1_000_000 / 1024**3
        print(f"  changelog per 1 M requests: {per_million:.2f} GiB written, "
              f"{kept:.2f} GiB kept by compaction (the newest record of each key)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--replays", type=int, default=12)
    parser.add_argument("--service", choices=sorted(PROFILES), action="append")
    args = parser.parse_args()
    broker = EmbeddedBroker(free_port())
    broker.start()
    try:
        for service in args.service or sorted(PROFILES):
            asyncio.run(main_async(broker, args.requests, PROFILES[service], args.replays))
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
