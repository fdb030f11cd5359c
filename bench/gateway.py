"""Gateway overhead and decision-API throughput on this machine.

    python bench/gateway.py [--requests 400] [--route-seconds 15]

One run: the embedded broker, a fake OpenAI-compatible upstream (bench/fake_upstream.py,
its own process) and `routemesh serve gateway` (its own process, local encoder, events
published to Kafka). The load comes from this process. Prints:

- proxy overhead = gateway latency minus a direct call to the same upstream, p50/p95/p99,
  at concurrency 1 and 32, for non-streaming requests and for streaming ones (time to
  the first byte); both measured here, in the same run;
- /v1/route requests/s and p50/p99 with 64 concurrent clients.

Targets: overhead p50 <= 10 ms and p99 <= 40 ms at concurrency 32; /v1/route >= 300
requests/s with p99 <= 50 ms. All processes share the machine's two cores. The
/v1/route load comes from wrk when it is installed (apt-get install wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from routemesh.services.runtime.embedded_broker import EmbeddedBroker, free_port

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "deploy" / "examples" / "lite-deep.yaml"
PROMPTS = ["what is the capital of peru?", "prove that sqrt 3 is irrational",
           "translate good night into german", "design a rate limiter for an api",
           "tell me a joke", "write a python function that merges two sorted lists"]


def pct(values, q):
    return float(np.percentile(values, q))


async def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} never became ready")
            await asyncio.sleep(0.5)


async def timed_calls(base: str, path: str, concurrency: int, total: int, stream: bool,
                      payload) -> list[float]:
    """Latency (ms) of ``total`` calls made by ``concurrency`` workers; for streams, the
    time to the first body byte."""
    latencies: list[float] = []
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        async def worker() -> None:
            for i in counter:
                started = time.perf_counter()
                first = None
                async with client.stream("POST", path, json=payload(i, stream)) as response:
                    async for _ in response.aiter_raw():
                        first = first or time.perf_counter()
                    if response.status_code != 200:
                        raise RuntimeError(f"{path} answered {response.status_code}")
                done = first if stream and first else time.perf_counter()
                latencies.append((done - started) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local prompts = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format(nil, nil, nil, '{"input": "' .. prompts[(i %% #prompts) + 1] .. '"}')
end
"""


def _ms(text: str) -> float:
    value = float(re.sub(r"[a-z]+$", "", text))
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[re.search(r"[a-z]+$", text).group()]


def wrk_route(url: str, seconds: float) -> tuple[float, float, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % ", ".join(f'"{p}"' for p in PROMPTS))
    out = subprocess.run(["wrk", "-t2", "-c64", f"-d{int(seconds)}s", "--latency", "-s",
                          script.name, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"50%\s+(\S+)", out).group(1))
    p99 = _ms(re.search(r"99%\s+(\S+)", out).group(1))
    return rps, p50, p99


def chat(i: int, stream: bool) -> dict:
    return {"model": "auto", "stream": stream,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}


def route(i: int, stream: bool) -> dict:
    return {"input": PROMPTS[i % len(PROMPTS)]}


async def run(args, broker: EmbeddedBroker) -> None:
    upstream_port, gateway_port, metrics_port = free_port(), free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="routemesh-bench-gateway-"))
    upstream = subprocess.Popen([sys.executable, str(HERE / "fake_upstream.py"),
                                 str(upstream_port)])
    env = dict(os.environ,
               ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
               ROUTEMESH_KAFKA_IDEMPOTENT_PRODUCER="false",
               ROUTEMESH_ROUTER_CONFIG=str(CONFIG),
               ROUTEMESH_QDRANT_PATH=str(work / "qdrant"),
               ROUTEMESH_BANK_AUTOBUILD="true",
               ROUTEMESH_AUTH_ENABLED="false",
               ROUTEMESH_SPOOL_DIR=str(work / "spool"),
               ROUTEMESH_HTTP_HOST="127.0.0.1",
               ROUTEMESH_HTTP_PORT=str(gateway_port),
               ROUTEMESH_METRICS_HOST="127.0.0.1",
               ROUTEMESH_METRICS_PORT=str(metrics_port),
               ROUTEMESH_LOG_LEVEL="WARNING",
               ROUTEMESH_UPSTREAM_BASE_URL=f"http://127.0.0.1:{upstream_port}/v1")
    gateway = subprocess.Popen([sys.executable, "-m", "routemesh.services.cli.main", "serve",
                                "gateway"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        await wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", gateway)
        direct = f"http://127.0.0.1:{upstream_port}/v1"
        proxied = f"http://127.0.0.1:{gateway_port}/v1"
        for base in (direct, proxied):
            await timed_calls(base, "/chat/completions", 8, 100, False, chat)
        print(f"{'mode':<14}{'conc':>5}  {'direct p50/p95/p99 ms':>24}  "
              f"{'gateway p50/p95/p99 ms':>24}  {'overhead p50/p95/p99 ms':>26}")
        for stream in (False, True):
            for concurrency in (1, 32):
                total = args.requests if concurrency > 1 else args.requests // 2
                d = await timed_calls(direct, "/chat/completions", concurrency, total, stream,
                                      chat)
                g = await timed_calls(proxied, "/chat/completions", concurrency, total,
                                      stream, chat)
                over = [pct(g, q) - pct(d, q) for q in (50, 95, 99)]
                mode = "stream TTFB" if stream else "non-stream"
                print(f"{mode:<14}{concurrency:>5}  "
                      f"{pct(d, 50):7.1f}/{pct(d, 95):7.1f}/{pct(d, 99):7.1f}  "
                      f"{pct(g, 50):7.1f}/{pct(g, 95):7.1f}/{pct(g, 99):7.1f}  "
                      f"{over[0]:8.1f}/{over[1]:7.1f}/{over[2]:7.1f}")
        if shutil.which("wrk"):
            # A C load generator: the Python client below spends most of the two cores
            # itself at 64 connections, starving the gateway it measures.
            rps, p50, p99 = await asyncio.to_thread(wrk_route, f"{proxied}/route",
                                                    args.route_seconds)
            client = "wrk"
        else:
            started = time.perf_counter()
            total = int(args.route_seconds * 300)
            latencies = await timed_calls(proxied, "/route", 64, total, False, route)
            rps = len(latencies) / (time.perf_counter() - started)
            p50, p99 = pct(latencies, 50), pct(latencies, 99)
            client = "python httpx (install wrk for a lighter load generator)"
        print(f"/v1/route at 64 clients ({client}): {rps:.0f} requests/s, "
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    finally:
        gateway.terminate()
        upstream.terminate()
        gateway.wait(30)
        upstream.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--route-seconds", type=float, default=10)
    args = parser.parse_args()
    broker = EmbeddedBroker(free_port())
    broker.start()
    try:
        asyncio.run(run(args, broker))
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
