"""What a shadow config costs the gateway: chat overhead at concurrency 8 with the shadow
off and on, in one run.

    python bench/shadow.py [--requests 800] [--rounds 2] [--upstream-latency-ms 250]

The embedded broker, the fake upstream (its own process) and `routemesh serve gateway`
with the lite-deep config, started once without and once with ROUTEMESH_SHADOW_CONFIG
(lite-deep with deep's threshold at 0.95), alternating for --rounds rounds. Every call's
prompt is made unique (its number appended) and both gateways keep an embedding cache of
the shadow queue's size: no call finds another call's vector, while the shadow finds the
live decision's, as it would in production. Overhead =
gateway latency minus a direct call to the same upstream, p50/p95/p99 ms, of the calls
after 3 s of load; with an upstream that answers at once (the gateway's CPU is the
limit) and with one that takes --upstream-latency-ms (requests in flight, as with a
model). Also the gateway's CPU per request and the shadow decisions it published or
dropped.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from gateway import (
    EXAMPLES,
    HERE,
    chat,
    cpu_seconds,
    start_gateway,
    timed_calls,
    wait_ready,
    with_broker,
)

from routemesh.services.runtime.embedded_broker import EmbeddedBroker, free_port
from routemesh.services.runtime.stats import Percentiles

CONCURRENCY = 8


def unique_chat(i: int, stream: bool) -> dict:
    body = chat(i, stream)
    body["messages"][0]["content"] += f" ({i})"
    return body


def shadow_config(work: Path) -> Path:
    text = (EXAMPLES / "lite-deep.yaml").read_text()
    deep = text.index("id: deep")
    path = work / "shadow.yaml"
    path.write_text(text[:deep] + text[deep:].replace("threshold: 0.60", "threshold: 0.95", 1))
    return path


async def shadow_counts(metrics_port: int) -> dict[str, float]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'routemesh_gateway_shadow_decisions_total\{outcome="(\w+)"\} (\S+)', text)}


async def measure(args, broker: EmbeddedBroker, upstream_port: int, shadow: bool
                  ) -> list[tuple[float, list[float], list[float], float]]:
    work = Path(tempfile.mkdtemp(prefix="routemesh-bench-shadow-"))
    extra = {"ROUTEMESH_SHADOW_CONFIG": str(shadow_config(work))} if shadow else {}
    # What a shadow keeps anyway, for both: the comparison is of the shadow alone.
    extra["ROUTEMESH_EMBEDDING_CACHE_SIZE"] = "1024"
    gateway, port, metrics = start_gateway(work, broker, upstream_port, "onnx", **extra)
    direct = f"http://127.0.0.1:{upstream_port}/v1"
    proxied = f"http://127.0.0.1:{port}/v1"
    rows = []
    try:
        await wait_ready(f"http://127.0.0.1:{metrics}/readyz", gateway)
        await timed_calls(proxied, "/chat/completions", CONCURRENCY, 100, False,
                          unique_chat)
        async with httpx.AsyncClient() as control:
            for latency in (0, args.upstream_latency_ms):
                (await control.post(f"http://127.0.0.1:{upstream_port}/control",
                                    json={"latency_ms": latency})).raise_for_status()
                _, d = await timed_calls(direct, "/chat/completions", CONCURRENCY,
                                         args.requests, False, chat, 3)
                cpu = cpu_seconds(gateway.pid)
                warm, g = await timed_calls(proxied, "/chat/completions", CONCURRENCY,
                                            args.requests, False, unique_chat, 3)
                cpu_ms = (cpu_seconds(gateway.pid) - cpu) * 1000 / (len(warm) + len(g))
                rows.append((latency, d, g, cpu_ms))
        if shadow:
            print(f"  shadow decisions: {await shadow_counts(metrics)}")
    finally:
        gateway.terminate()
        gateway.wait(30)
    return rows


async def run(args, broker: EmbeddedBroker) -> None:
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(HERE / "fake_upstream.py"),
                                 str(upstream_port)])
    overheads: dict[tuple[bool, float], list[float]] = {}
    try:
        print(f"chat, non-streaming, concurrency {CONCURRENCY}, {args.requests} calls after "
              "3 s of load; overhead = gateway - direct, ms")
        print(f"{'shadow':<7}{'upstream':>9}  {'direct p50/p95/p99':>22}  "
              f"{'overhead p50/p95/p99':>22}  {'CPU ms/req':>10}")
        for _ in range(args.rounds):
            for shadow in (False, True):
                for latency, d, g, cpu_ms in await measure(args, broker, upstream_port,
                                                           shadow):
                    dp, gp = Percentiles.of(d), Percentiles.of(g)
                    over = (gp.p50 - dp.p50, gp.p95 - dp.p95, gp.p99 - dp.p99)
                    overheads.setdefault((shadow, latency), []).append(over[0])
                    print(f"{'on' if shadow else 'off':<7}{latency:>7g}ms  "
                          f"{dp.p50:6.1f}/{dp.p95:6.1f}/{dp.p99:6.1f}  "
                          f"{over[0]:6.1f}/{over[1]:6.1f}/{over[2]:6.1f}  {cpu_ms:10.2f}",
                          flush=True)
        for latency in (0, args.upstream_latency_ms):
            off = sum(overheads[(False, latency)]) / args.rounds
            on = sum(overheads[(True, latency)]) / args.rounds
            print(f"upstream {latency:g} ms: mean overhead p50 off {off:.1f} ms, on "
                  f"{on:.1f} ms, ratio on/off {on / off:.2f}")
    finally:
        upstream.terminate()
        upstream.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--upstream-latency-ms", type=float, default=250)
    with_broker(run, parser.parse_args())


if __name__ == "__main__":
    main()
