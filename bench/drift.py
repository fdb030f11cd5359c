"""Drift detector figures: throughput through the real broker, detection delay, false
alarms.

    python bench/drift.py [--observations 200000] [--seeds 200] [--stable 100000]

One run. Prints:

- throughput: ``--observations`` observations published to the embedded broker first,
  then read from the start by (a) a plain aiokafka reader that decodes nothing, (b) the
  consumer runtime with a handler that does nothing (read, decode, dedup, commit: what
  the detector cannot avoid), (c) the drift detector service (the same consumer, every
  model judged after each observation, the state saved before each commit). Each read
  twice, interleaved; the better of the two counts. Observations/s, the detector's
  ratio to (b) and to (a), and p50/p95/p99 of its handler time per event (per batch);
- detection delay: for each preset and kind of incident (answers collapsing to 30 % of
  their length, 30 % empty answers, half the requests failing, tools never called), the
  observations from the change to the alert, over ``--seeds`` synthetic streams;
- false alarms: alerts raised on ``--stable`` observations of a stable stream, per preset,
  for three levels of length noise and two window sizes.

Targets: >= 20,000 observations/s end to end; ratio to the consume-only reader >= 0.7.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry

from routemesh.contracts import CompletionObserved
from routemesh.contracts.topics import LLM_OBSERVATIONS, ROUTE_DECISIONS
from routemesh.services.drift_detector import Detector
from routemesh.services.drift_detector.service import SPEC, DriftDetectorSettings
from routemesh.services.runtime.embedded_broker import EmbeddedBroker, free_port
from routemesh.services.runtime.kafka import create_topics
from routemesh.services.runtime.service import ServiceContext, build_context
from routemesh.services.runtime.stats import Percentiles

# The synthetic streams the detector's tests use, and the readers it is measured against.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stream_bench import publish_events, raw_reader, runtime_reader, service_reader
from tests.services.drift_detector.streams import healthy

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["small-model", "large-model"]
PRESETS = ("low", "normal", "high")
TOPICS = (LLM_OBSERVATIONS, ROUTE_DECISIONS)


def observations(n: int) -> Iterator[CompletionObserved]:
    rng = random.Random(1)
    for i in range(n):
        view = healthy(rng, i, model=MODELS[i % 2], route="lite" if i % 2 else "deep")
        yield CompletionObserved(request_id=f"r{i}", route_id=view.route_id,
                                 target_model=view.target_model, occurred_at=view.occurred_at,
                                 upstream_status=view.upstream_status,
                                 completion_tokens=view.completion_tokens,
                                 finish_reason=view.finish_reason,
                                 tools_requested=view.tools_requested,
                                 tools_used=view.tools_used, ttft_ms=view.ttft_ms,
                                 duration_ms=300.0)


async def detector_reader(ctx: ServiceContext, n: int, per_event_us: list[float]) -> float:
    settings = ctx.settings.model_copy(update={
        "drift_state_dir": Path(tempfile.mkdtemp(prefix="routemesh-bench-drift-"))})
    service = SPEC.factory(dataclasses.replace(ctx, settings=settings,
                                               registry=CollectorRegistry()))
    return await service_reader(service, n, per_event_us)


async def throughput(broker: EmbeddedBroker, n: int) -> None:
    settings = DriftDetectorSettings(
        kafka_bootstrap_servers=broker.bootstrap, kafka_idempotent_producer=False,
        topic_prefix="bench.", router_config=ROOT / "deploy/examples/lite-deep.yaml")
    await create_topics(settings)
    await publish_events(settings, observations(n))
    rates: dict[str, list[float]] = {"raw": [], "runtime": [], "detector": []}
    per_event_us: list[float] = []
    ctx = build_context(SPEC, settings)
    await ctx.producer.start()
    try:
        for _ in range(2):
            rates["raw"].append(await raw_reader(settings, [LLM_OBSERVATIONS], n))
            rates["runtime"].append(await runtime_reader(ctx, TOPICS, n))
            rates["detector"].append(await detector_reader(ctx, n, per_event_us))
    finally:
        await ctx.producer.stop()
    best = {name: max(values) for name, values in rates.items()}
    print(f"throughput, {n} observations read from the start of the topic (obs/s; "
          "each read twice, both shown, the better counts):")
    print(f"  (a) plain aiokafka reader, nothing decoded: "
          f"{' '.join(f'{r:8.0f}' for r in rates['raw'])}")
    print(f"  (b) consumer runtime, no-op handler:        "
          f"{' '.join(f'{r:8.0f}' for r in rates['runtime'])}")
    print(f"  (c) drift detector service:                 "
          f"{' '.join(f'{r:8.0f}' for r in rates['detector'])}")
    print(f"  ratio (c)/(b): {best['detector'] / best['runtime']:.2f}   "
          f"(c)/(a): {best['detector'] / best['raw']:.2f}")
    handler = Percentiles.of(per_event_us)
    print(f"  detector handler time per event (per batch), us: p50 {handler.p50:.1f}  "
          f"p95 {handler.p95:.1f}  p99 {handler.p99:.1f}")
    met = best["detector"] >= 20_000 and best["detector"] / best["runtime"] >= 0.7
    print(f"  targets (>= 20,000/s, ratio to (b) >= 0.7): {'met' if met else 'MISSED'}")


INCIDENTS = {
    "length to 30 %": dict(scale=0.3),
    "30 % empty": dict(empty=0.3),
    "50 % errors": dict(errors=0.5),
    "tools never called": dict(silent=1.0, tools=0.5),
}


def delay(preset: str, incident: dict, seed: int, limit: int = 200) -> int | None:
    """Observations from the change to the first alert that is not a false alarm
    (None: not within ``limit``)."""
    rng = random.Random(seed)
    detector = Detector(preset)
    change = 100
    healthy_noise = dict(sigma=0.25, tools=incident.get("tools", 0.1))
    for i in range(change + limit):
        fields = dict(healthy_noise, **incident) if i >= change else healthy_noise
        for transition in detector.add_observation(healthy(rng, i, **fields)):
            if transition.verdict.state in ("mild", "severe"):
                if i >= change:
                    return i - change + 1
                detector.state.subjects.clear()  # a false alarm before the change: ignore
    return None


def detection(seeds: int) -> None:
    print(f"detection delay, observations from the change to the alert over {seeds} streams "
          "(lengths with lognormal noise 0.25); median / p95 / detected:")
    print(f"  {'incident':<20}" + "".join(f"{p:>24}" for p in PRESETS))
    for name, incident in INCIDENTS.items():
        cells = []
        for preset in PRESETS:
            found = [delay(preset, incident, seed) for seed in range(seeds)]
            hits = sorted(d for d in found if d is not None)
            if hits:
                p95 = hits[min(len(hits) - 1, int(0.95 * len(hits)))]
                cells.append(f"{statistics.median(hits):5.0f} / {p95:3d} / "
                             f"{len(hits) / seeds:4.0%}")
            else:
                cells.append("not detected")
        print(f"  {name:<20}" + "".join(f"{c:>24}" for c in cells))


def false_alarms(n: int) -> None:
    print(f"false alarms on {n} observations of a stable stream (alerts to mild or severe):")
    print(f"  {'length noise':<14}{'window':>8}" + "".join(f"{p:>10}" for p in PRESETS))
    for sigma in (0.15, 0.25, 0.5):
        for window in (20, 50):
            counts = []
            for preset in PRESETS:
                rng = random.Random(11)
                detector = Detector(preset, window=window)
                alarms = 0
                for i in range(n):
                    for t in detector.add_observation(healthy(rng, i, sigma=sigma)):
                        alarms += t.verdict.state in ("mild", "severe")
                counts.append(alarms)
            print(f"  {sigma:<14}{window:>8}" + "".join(f"{c:>10}" for c in counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observations", type=int, default=200_000)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--stable", type=int, default=100_000)
    args = parser.parse_args()
    broker = EmbeddedBroker(free_port())
    broker.start()
    try:
        asyncio.run(throughput(broker, args.observations))
    finally:
        broker.stop()
    detection(args.seeds)
    false_alarms(args.stable)


if __name__ == "__main__":
    main()
