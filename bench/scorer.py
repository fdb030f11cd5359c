"""Scorer throughput through the real broker.

    python bench/scorer.py [--requests 100000] [--outcome-share 0.6]

One run. ``--requests`` decisions and their observations, and outcomes for
``--outcome-share`` of them (some before their decision, some hours late, a few twice),
published to the embedded broker first, then read from the start by (a) a plain aiokafka
reader that decodes nothing, (b) the consumer runtime with a handler that does nothing,
(c) the scorer service (every event joined and counted; the state saved before each
commit, every 5 s as by default). Each read twice, interleaved; the better counts.
Prints events/s, the scorer's ratio to (b) and (a), p50/p95/p99 of its handler time per
event (per batch), and the state save time and size at the end.

Target: >= 10,000 joined events/s end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry

from routemesh.contracts import Event
from routemesh.contracts.events import utc_now
from routemesh.contracts.topics import LLM_OBSERVATIONS, ROUTE_DECISIONS, ROUTE_OUTCOMES
from routemesh.services.runtime.embedded_broker import EmbeddedBroker, free_port
from routemesh.services.runtime.kafka import create_topics
from routemesh.services.runtime.service import ServiceContext, build_context
from routemesh.services.runtime.stats import Percentiles
from routemesh.services.scorer.service import SPEC, ScorerSettings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stream_bench import publish_events, raw_reader, runtime_reader, service_reader
from tests.services.scorer.events import decided, observed, outcome

ROOT = Path(__file__).resolve().parent.parent
TOPICS = (ROUTE_DECISIONS, LLM_OBSERVATIONS, ROUTE_OUTCOMES)


def traffic(requests: int, outcome_share: float) -> Iterator[Event]:
    """Decisions and observations, and outcomes for ``outcome_share`` of the requests:
    some before their decision, some hours late, a few twice."""
    rng = random.Random(1)
    start = utc_now() - timedelta(hours=12)
    for i in range(requests):
        at = start + timedelta(seconds=i * 0.3)
        top = rng.choice(["lite", "deep"])
        events = [decided(f"r{i}", top, rng.uniform(0.3, 1.0), at=at,
                          latency_ms=rng.uniform(3, 30)),
                  observed(f"r{i}", at=at, status=200 if rng.random() > 0.01 else 502)]
        if rng.random() < outcome_share:
            truth = top if rng.random() < 0.9 else rng.choice(["lite", "deep"])
            late = outcome(f"r{i}", truth, at=at + timedelta(hours=rng.choice([0, 1, 6])))
            events.insert(0 if rng.random() < 0.05 else 2, late)
            if rng.random() < 0.02:
                events.append(late)
        yield from events


async def scorer_reader(ctx: ServiceContext, n: int, per_event_us: list[float],
                        saves: list[tuple[float, int]]) -> float:
    state_dir = Path(tempfile.mkdtemp(prefix="routemesh-bench-scorer-"))
    settings = ctx.settings.model_copy(update={"scorer_state_dir": state_dir})
    service = SPEC.factory(dataclasses.replace(ctx, settings=settings,
                                               registry=CollectorRegistry()))
    rate = await service_reader(service, n, per_event_us)
    started = time.perf_counter()
    await service._save()
    saves.append((time.perf_counter() - started,
                  (state_dir / "state.msgpack").stat().st_size))
    return rate


async def throughput(broker: EmbeddedBroker, requests: int, outcome_share: float) -> None:
    settings = ScorerSettings(
        kafka_bootstrap_servers=broker.bootstrap, kafka_idempotent_producer=False,
        topic_prefix="bench.", router_config=ROOT / "deploy/examples/lite-deep.yaml")
    await create_topics(settings)
    print(f"publishing {requests} requests' events ...", flush=True)
    n = await publish_events(settings, traffic(requests, outcome_share))
    rates: dict[str, list[float]] = {"raw": [], "runtime": [], "scorer": []}
    per_event_us: list[float] = []
    saves: list[tuple[float, int]] = []
    ctx = build_context(SPEC, settings)
    await ctx.producer.start()
    try:
        for round_ in (1, 2):
            print(f"reading, round {round_} of 2 ...", flush=True)
            rates["raw"].append(await raw_reader(settings, TOPICS, n))
            rates["runtime"].append(await runtime_reader(ctx, TOPICS, n))
            rates["scorer"].append(await scorer_reader(ctx, n, per_event_us, saves))
    finally:
        await ctx.producer.stop()
    best = {name: max(values) for name, values in rates.items()}
    print(f"throughput, {n} events ({requests} requests: decisions, observations, "
          f"{outcome_share:.0%} with outcomes) read from the start (events/s; each read "
          "twice, both shown, the better counts):")
    print(f"  (a) plain aiokafka reader, nothing decoded: "
          f"{' '.join(f'{r:8.0f}' for r in rates['raw'])}")
    print(f"  (b) consumer runtime, no-op handler:        "
          f"{' '.join(f'{r:8.0f}' for r in rates['runtime'])}")
    print(f"  (c) scorer service:                         "
          f"{' '.join(f'{r:8.0f}' for r in rates['scorer'])}")
    print(f"  ratio (c)/(b): {best['scorer'] / best['runtime']:.2f}   "
          f"(c)/(a): {best['scorer'] / best['raw']:.2f}")
    handler = Percentiles.of(per_event_us)
    print(f"  scorer handler time per event (per batch), us: p50 {handler.p50:.1f}  "
          f"p95 {handler.p95:.1f}  p99 {handler.p99:.1f}")
    seconds, size = saves[-1]
    print(f"  state save at the end: {seconds * 1000:.0f} ms, {size / 1e6:.1f} MB")
    print(f"  target (>= 10,000 events/s): {'met' if best['scorer'] >= 10_000 else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--outcome-share", type=float, default=0.6)
    args = parser.parse_args()
    broker = EmbeddedBroker(free_port())
    broker.start()
    try:
        asyncio.run(throughput(broker, args.requests, args.outcome_share))
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
