"""Decision latency and throughput of the router core on this CPU.

    python bench/decision.py [--bank-size 10000] [--requests 600] [--concurrency 32]
                             [--encoder-backend onnx|onnx-int8|torch]

One run, the local encoder (MiniLM; by default the back-end a config gets when it names
none), an in-memory snapshot of a bank of ``--bank-size`` utterances (the shipped
lite-deep and multi-route utterances, expanded with phrasing variants), queried with the
shipped eval prompts. Prints:

- single-request decision latency p50/p95/p99 (encode + match + event);
- the match alone (encoding excluded) p50/p95;
- decisions/s with ``--concurrency`` concurrent callers (micro-batched encoding);
- raw batched encoder throughput (texts/s at the same batch size) and the ratio;
- the decision latency of a repeated prompt, its vector from the embedding cache the
  gateway keeps by default (every figure above is without it);
- the median decision time of 200-, 2,000- and 200,000-character prompts.

Targets: decision p50 <= 8 ms, p99 <= 20 ms; match p95 <= 1 ms; ratio >= 0.7.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from pathlib import Path
from typing import get_args

import msgspec

from routemesh.services.router import (
    CachingEncoder,
    EncoderBackend,
    EncoderConfig,
    LoadedConfig,
    Router,
    RouteRequest,
    load_config,
    load_dataset,
    load_router,
)
from routemesh.services.router.bank import limit_blas_threads
from routemesh.services.router.config import Utterance
from routemesh.services.router.encoders import LocalEncoder, SparseEncoder
from routemesh.services.runtime.stats import Percentiles

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"
PREFIXES = ["", "please ", "can you ", "quick question: ", "I need help: ", "hey, ",
            "could you ", "urgent: ", "for work, ", "out of curiosity, "]
SUFFIXES = ["", " thanks", " please", " in detail", " briefly", " step by step",
            " for a beginner", " asap", " with examples", " if you can"]


def big_bank(size: int) -> LoadedConfig:
    """The lite-deep config with its utterances expanded to ``size`` phrasing variants."""
    base = load_config(EXAMPLES / "lite-deep.yaml")
    multi = load_config(EXAMPLES / "multi-route.yaml")
    to_tier = {"coding": "deep", "math": "deep", "writing": "deep",
               "extraction": "lite", "chat": "lite", "support": "lite"}
    seeds = [(u.route_id, u.text) for u in base.utterances]
    seeds += [(to_tier[u.route_id], u.text) for u in multi.utterances]
    variants = itertools.product(PREFIXES, SUFFIXES)
    utterances: list[Utterance] = []
    for prefix, suffix in variants:
        for route_id, text in seeds:
            if len(utterances) == size:
                break
            utterances.append(Utterance(route_id, f"{prefix}{text}{suffix}", "bench",
                                        len(utterances), f"bench:{len(utterances)}"))
    if len(utterances) < size:
        raise SystemExit(f"can only make {len(utterances)} variants")
    return LoadedConfig(base.config, "bench:lite-deep-10k", base.sha256, tuple(utterances))


async def concurrent(router: Router, prompts: list[RouteRequest], concurrency: int) -> float:
    queue = list(enumerate(prompts))

    async def caller() -> None:
        while queue:
            i, request = queue.pop()
            await router.adecide(request, str(i))

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(prompts) / (time.perf_counter() - start)


def timed_decisions(router: Router, prompts: list[RouteRequest]) -> list[float]:
    """Each prompt decided alone, one after another: milliseconds per decision."""
    timings = []
    for i, request in enumerate(prompts):
        t0 = time.perf_counter()
        router.decide(request, str(i))
        timings.append((time.perf_counter() - t0) * 1000)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank-size", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--encoder-backend", default=EncoderConfig().backend,
                        choices=get_args(EncoderBackend))
    args = parser.parse_args()

    limit_blas_threads()
    encoder = LocalEncoder(args.encoder_backend)
    loaded = big_bank(args.bank_size)
    started = time.perf_counter()
    router = load_router(loaded, encoder=encoder)
    build_s = time.perf_counter() - started
    bank = router.matcher

    items = load_dataset(EXAMPLES / "lite-deep.eval.jsonl")
    items += load_dataset(EXAMPLES / "multi-route.eval.jsonl")
    prompts = [items[i % len(items)].request for i in range(args.requests)]
    for request in prompts[:20]:
        router.decide(request, "warm-up")

    decision_ms = timed_decisions(router, prompts)

    texts = [r.match_text("last_user") for r in prompts]
    vectors = encoder.encode(texts)
    sparse = [SparseEncoder.query(t) for t in texts]
    def time_matches() -> list[float]:
        timings = []
        for vector, query in zip(vectors, sparse, strict=True):
            t0 = time.perf_counter()
            bank.match(vector, query, loaded.config.semantic)
            timings.append((time.perf_counter() - t0) * 1000)
        return timings

    match_ms = time_matches()
    # The same bank scored as before the route model (its best utterance, no head): the
    # cost the model adds to a decision, in the same run.
    fitted = bank.model
    bank.use(msgspec.structs.replace(fitted, scoring="max", head=None))
    max_ms = time_matches()
    bank.use(fitted)

    per_second = asyncio.run(concurrent(router, prompts, args.concurrency))

    # The same prompts again through a router whose encoder has seen them all.
    cached = Router(router.loaded, bank, CachingEncoder(encoder, None))
    for request in prompts:
        cached.decide(request, "fill")
    hit_ms = timed_decisions(cached, prompts)

    # A 200,000-character prompt against 200-character ones: the encoder sees a bounded
    # cut of the long one, so its decision must cost about the same.
    lengths = (200, 2_000, 200_000)
    by_length = {n: statistics.median(timed_decisions(
        router, [RouteRequest.from_text((t * n)[:n]) for t in texts[:40]])) for n in lengths}
    short_ms, long_ms = by_length[200], by_length[200_000]

    # The same prompts, in batches of the same size, straight into the encoder.
    size = args.concurrency
    t0 = time.perf_counter()
    for start in range(0, len(texts), size):
        encoder.encode(texts[start : start + size])
    raw = len(texts) / (time.perf_counter() - t0)

    print(f"encoder {encoder.name}; bank: {len(bank)} utterances, built in {build_s:.1f} s; "
          f"{len(prompts)} requests from the shipped eval sets")
    decision, match = Percentiles.of(decision_ms), Percentiles.of(match_ms)
    print(f"decision latency ms (single caller): p50 {decision.p50:.2f}  "
          f"p95 {decision.p95:.2f}  p99 {decision.p99:.2f}  "
          f"(mean {statistics.mean(decision_ms):.2f})")
    baseline = Percentiles.of(max_ms)
    print(f"match only ms (encoding excluded): p50 {match.p50:.3f}  "
          f"p95 {match.p95:.3f}  ({bank.model.scoring}); the same bank scored by its best "
          f"utterance: p50 {baseline.p50:.3f}  p95 {baseline.p95:.3f}, so the route model "
          f"adds {match.p50 - baseline.p50:+.3f} ms at p50")
    print(f"decisions/s at {args.concurrency} concurrent callers: {per_second:.1f}")
    print(f"raw batched encoder throughput (same prompts, batches of {size}): {raw:.1f} texts/s")
    print(f"ratio concurrent decisions / raw encoder: {per_second / raw:.2f}")
    hit = Percentiles.of(hit_ms)
    print(f"decision latency ms, a repeated prompt from the embedding cache: p50 "
          f"{hit.p50:.2f}  p95 {hit.p95:.2f}  ({decision.p50 / hit.p50:.1f}x faster at p50)")
    print("median decision ms by prompt length: " + ", ".join(
        f"{n:,} characters {ms:.2f}" for n, ms in by_length.items())
        + f"; 200,000 / 200: {long_ms / short_ms:.2f}, 200,000 / 2,000: "
        f"{long_ms / by_length[2_000]:.2f} (the encoder reads at most 256 tokens)")
    targets = [
        ("decision p50 <= 8 ms", decision.p50 <= 8),
        ("200,000-character ratio <= 2", long_ms / short_ms <= 2),
        ("decision p99 <= 20 ms", decision.p99 <= 20),
        ("match p95 <= 1 ms", match.p95 <= 1),
        ("ratio >= 0.7", per_second / raw >= 0.7),
    ]
    print("targets: " + ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in targets))


if __name__ == "__main__":
    main()
