"""Gateway overhead and decision-API throughput on this machine.

    python bench/gateway.py [--encoder-backend onnx|onnx-int8|torch] [--requests 1000]
                            [--upstream-latency-ms 250] [--warmup-seconds 3]
                            [--route-rate N] [--route-only]

One run: the embedded broker, a fake OpenAI-compatible upstream (bench/fake_upstream.py,
its own process) and `routemesh serve gateway` (its own process, the local encoder with
the shipped lite-deep config, events published to Kafka). Prompts are the 310 distinct
single prompts of the lite-deep eval set. Prints:

- proxy overhead = gateway latency minus a direct call to the same upstream, p50/p95/p99,
  at concurrency 1 and 32, for non-streaming requests and for streaming ones (time to
  the first byte); both measured here, in the same run. At concurrency 32 twice: with an
  upstream that answers at once (every client re-sends the moment it has an answer: the
  gateway's saturation, where the overhead is queueing for the two cores) and with an
  upstream that takes --upstream-latency-ms to answer, as a model does, so that 32
  requests are in flight. Each figure is of the steady state: the --requests calls that
  start after --warmup-seconds of the same load. At concurrency 32 a second line
  ("start") gives the calls of those first seconds, when all clients start at once on
  new connections;
- /v1/route with 64 concurrent clients (wrk): at saturation (each client re-sends at
  once: the most requests/s), paced at 70 % of that (or --route-rate requests/s in all),
  and at saturation with requests the router decides without the encoder (no text),
  whose gateway CPU per request is everything but the encoder and the match; then the
  encoder alone on the same prompts in this process, and saturation / encoder.

Targets: chat overhead p99 <= 40 ms at concurrency 32; /v1/route saturation / encoder
>= 0.8; paced p99 <= 50 ms; gateway CPU per request without the encoder <= 1 ms. All
processes share the machine's two cores. The /v1/route load needs wrk (apt-get install
wrk); without it that part is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import get_args

import aiohttp
import httpx
import yaml

from routemesh.services.router import EncoderBackend, EncoderConfig
from routemesh.services.router.encoders import LocalEncoder
from routemesh.services.runtime.embedded_broker import EmbeddedBroker, free_port
from routemesh.services.runtime.stats import Percentiles

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "deploy" / "examples"
PROMPTS = [row["prompt"] for row in map(json.loads, (EXAMPLES / "lite-deep.eval.jsonl").open())
           if "prompt" in row]


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
                      payload, warmup_s: float = 0.0) -> tuple[list[float], list[float]]:
    """Latencies (ms) from ``concurrency`` workers calling without pause: those of the
    calls started in the first ``warmup_s`` seconds, and those of the ``total`` calls
    started after them. For streams, the time to the first body byte.

    One load, one connection pool: a separate warm-up round ended with every worker idle
    and the measurement opened new connections and started all workers in the same
    instant, so its first rounds (6 % of 1000 calls) were a synchronised burst that
    stayed bunched for seconds and made up the whole p95/p99. The burst is reported on
    its own (the warm-up figures), not mixed into the steady state.

    aiohttp, not httpx, on this side too: httpx's pool costs the client 1.3-1.6 ms of CPU
    per request at 32 connections (see services/gateway/upstream.py), which on two shared
    cores became tail latency of the direct calls and the proxied ones alike."""
    warm: list[float] = []
    measured: list[float] = []
    index = iter(range(2**62))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url=base.rstrip("/") + "/", connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as client:
        steady_from = time.perf_counter() + warmup_s
        started_measured = 0

        async def worker() -> None:
            nonlocal started_measured
            for i in index:
                started = time.perf_counter()
                into = warm if started < steady_from else measured
                if into is measured:
                    if started_measured == total:
                        return
                    started_measured += 1
                first = None
                async with client.post(path.lstrip("/"), json=payload(i, stream)) as response:
                    async for _ in response.content.iter_any():
                        first = first or time.perf_counter()
                    if response.status != 200:
                        raise RuntimeError(f"{path} answered {response.status}")
                done = first if stream and first else time.perf_counter()
                into.append((done - started) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return warm, measured


# Bodies are JSON-encoded here and handed to Lua as long strings, so no prompt needs
# escaping in Lua. Each wrk thread starts at its own place in the bodies, so the threads
# do not send the same prompt at the same moment (the gateway encodes a text once for all
# its concurrent requests, which would flatter the figures). With a rate, each wrk thread
# hands its connections send slots spaced evenly in time (clock from LuaJIT's FFI); a
# connection whose slot has not come waits.
WRK_SCRIPT = """
local bodies = {%(bodies)s}
local rate = %(rate)s
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local threads = 0
setup = function(thread)
  thread:set("i", threads * math.floor(#bodies / %(threads)d))
  threads = threads + 1
end
i = 0
request = function()
  i = i + 1
  return wrk.format(nil, nil, nil, bodies[(i %% #bodies) + 1])
end
if rate > 0 then
  local ffi = require("ffi")
  ffi.cdef[[
    typedef struct { long tv_sec; long tv_nsec; } routemesh_timespec;
    int clock_gettime(int clk_id, routemesh_timespec *tp);
  ]]
  local now = ffi.new("routemesh_timespec")
  local interval = 1000 / (rate / %(threads)d)
  local next_slot = nil
  delay = function()
    ffi.C.clock_gettime(1, now)
    local t = tonumber(now.tv_sec) * 1000 + tonumber(now.tv_nsec) / 1e6
    next_slot = next_slot or t + math.random() * interval
    local slot = next_slot
    next_slot = math.max(next_slot, t - 1000) + interval
    return math.max(0, slot - t)
  end
end
"""
WRK_THREADS = 2
# The paced /v1/route load, as a share of the saturation rate measured in the same run.
ROUTE_PACE = 0.7


def _ms(text: str) -> float:
    value = float(re.sub(r"[a-z]+$", "", text))
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[re.search(r"[a-z]+$", text).group()]


def wrk_route(url: str, seconds: float, rate: float,
              payload=None) -> tuple[float, float, float, int]:
    payload = payload or route
    bodies = ", ".join(f"[==[{json.dumps(payload(i, False))}]==]" for i in range(len(PROMPTS)))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % {"bodies": bodies, "rate": rate, "threads": WRK_THREADS})
    out = subprocess.run(["wrk", f"-t{WRK_THREADS}", "-c64", f"-d{int(seconds)}s",
                          "--latency", "-s", script.name, url],
                         capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    try:
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        # Anchored: the thread-stats lines end in percentages such as "72.50%" too.
        p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))
        p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))
    except (AttributeError, KeyError, ValueError):
        raise RuntimeError(f"could not read wrk's output:\n{out}") from None
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, p50, p99, int(errors.group(1)) if errors else 0


def raw_encoder_rate(backend: str) -> float:
    """Texts/s of the encoder alone on the bench prompts, in batches of 32, with the
    threads a config gets by default (the gateway's): the ceiling of /v1/route."""
    encoder = LocalEncoder(backend, threads=EncoderConfig().threads)
    encoder.encode(PROMPTS[:32])
    started = time.perf_counter()
    for start in range(0, len(PROMPTS), 32):
        encoder.encode(PROMPTS[start : start + 32])
    return len(PROMPTS) / (time.perf_counter() - started)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc; psutil is not a
    dependency and this is one line of it)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def chat(i: int, stream: bool) -> dict:
    return {"model": "auto", "stream": stream,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}


def route(i: int, stream: bool) -> dict:
    return {"input": PROMPTS[i % len(PROMPTS)]}


def unencoded(i: int, stream: bool) -> dict:
    """A request the router decides without the encoder (no text: the default route)."""
    return {"messages": [{"role": "user", "content": ""}]}


def bench_config(work: Path, backend: str) -> Path:
    """The shipped lite-deep config with the chosen local encoder back-end."""
    config = yaml.safe_load((EXAMPLES / "lite-deep.yaml").read_text())
    config["encoder"] = dict(config.get("encoder") or {}, kind="local", backend=backend)
    shutil.copytree(EXAMPLES / "lite-deep", work / "lite-deep")
    path = work / "lite-deep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _triple(values: list[float]) -> str:
    p = Percentiles.of(values)
    return f"{p.p50:7.1f}/{p.p95:7.1f}/{p.p99:7.1f}"


async def overhead(direct: str, proxied: str, stream: bool, concurrency: int,
                   total: int, label: str, warmup_s: float) -> None:
    """One line for the steady state (calls started after ``warmup_s`` of load) and, at
    concurrency > 1, one for the warm-up itself: every client starting at once on new
    connections, a cold burst that no steady load has."""
    (direct_start, direct_steady), (proxied_start, proxied_steady) = [
        await timed_calls(base, "/chat/completions", concurrency, total, stream, chat,
                          warmup_s)
        for base in (direct, proxied)
    ]
    mode = "stream TTFB" if stream else "non-stream"
    phases = [("", direct_steady, proxied_steady)]
    if concurrency > 1:
        phases.append(("start", direct_start, proxied_start))
    for phase, d, g in phases:
        gp, dp = Percentiles.of(g), Percentiles.of(d)
        over = [gp.p50 - dp.p50, gp.p95 - dp.p95, gp.p99 - dp.p99]
        print(f"{mode:<12}{concurrency:>5}  {label:>10}  {phase:>5}  {_triple(d)}  {_triple(g)}"
              f"  {over[0]:8.1f}/{over[1]:7.1f}/{over[2]:7.1f}", flush=True)


def start_gateway(work: Path, broker: EmbeddedBroker, upstream_port: int, backend: str,
                  **env: str) -> tuple[subprocess.Popen, int, int]:
    """`routemesh serve gateway` on free ports with the lite-deep config on ``backend``;
    returns the process, its HTTP port and its metrics port."""
    gateway_port, metrics_port = free_port(), free_port()
    settings = dict(os.environ,
                    ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
                    ROUTEMESH_KAFKA_IDEMPOTENT_PRODUCER="false",
                    ROUTEMESH_ROUTER_CONFIG=str(bench_config(work, backend)),
                    ROUTEMESH_QDRANT_PATH=str(work / "qdrant"),
                    ROUTEMESH_BANK_AUTOBUILD="true",
                    ROUTEMESH_AUTH_ENABLED="false",
                    ROUTEMESH_SPOOL_DIR=str(work / "spool"),
                    ROUTEMESH_HTTP_HOST="127.0.0.1",
                    ROUTEMESH_HTTP_PORT=str(gateway_port),
                    ROUTEMESH_METRICS_HOST="127.0.0.1",
                    ROUTEMESH_METRICS_PORT=str(metrics_port),
                    ROUTEMESH_LOG_LEVEL="WARNING",
                    # The figures are the encoder's: repeated bench prompts must not hit a cache.
                    ROUTEMESH_EMBEDDING_CACHE_SIZE="0",
                    ROUTEMESH_UPSTREAM_BASE_URL=f"http://127.0.0.1:{upstream_port}/v1") | env
    gateway = subprocess.Popen([sys.executable, "-m", "routemesh.services.cli.main", "serve",
                                "gateway"], env=settings, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    return gateway, gateway_port, metrics_port


async def run(args, broker: EmbeddedBroker) -> None:
    upstream_port = free_port()
    work = Path(tempfile.mkdtemp(prefix="routemesh-bench-gateway-"))
    upstream = subprocess.Popen([sys.executable, str(HERE / "fake_upstream.py"),
                                 str(upstream_port)])
    gateway, gateway_port, metrics_port = start_gateway(work, broker, upstream_port,
                                                        args.encoder_backend)
    try:
        await wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", gateway)
        direct = f"http://127.0.0.1:{upstream_port}/v1"
        proxied = f"http://127.0.0.1:{gateway_port}/v1"
        for base in (direct, proxied):
            await timed_calls(base, "/chat/completions", 8, 100, False, chat)
        print(f"encoder back-end {args.encoder_backend}; {len(PROMPTS)} distinct prompts; "
              f"figures of the {args.requests} calls after {args.warmup_seconds:g} s of load; "
              f"'start': the calls of those first seconds")
        print(f"{'mode':<12}{'conc':>5}  {'upstream':>10}  {'phase':>5}  "
              f"{'direct p50/p95/p99 ms':>23}  {'gateway p50/p95/p99 ms':>23}  "
              f"{'overhead p50/p95/p99 ms':>25}")
        async with httpx.AsyncClient() as control:
            for latency in () if args.route_only else (0, args.upstream_latency_ms):
                (await control.post(f"http://127.0.0.1:{upstream_port}/control",
                                    json={"latency_ms": latency})).raise_for_status()
                for stream in (False, True):
                    for concurrency in ((1, 32) if latency == 0 else (32,)):
                        total = args.requests if concurrency > 1 else args.requests // 2
                        await overhead(direct, proxied, stream, concurrency, total,
                                       f"{latency:g} ms", args.warmup_seconds)
        if not shutil.which("wrk"):
            print("/v1/route: skipped, wrk is not installed (apt-get install wrk)")
            return
        saturation = 0.0
        for rate, label, payload in ((0, "saturation", route), (None, "paced", route),
                                     (0, "no encoding", unencoded)):
            if rate is None:
                rate = args.route_rate or round(ROUTE_PACE * saturation)
                label = f"paced {rate:g}/s"
            cpu = cpu_seconds(gateway.pid)
            rps, p50, p99, errors = await asyncio.to_thread(
                wrk_route, f"{proxied}/route", args.route_seconds, rate, payload)
            # CPU per request is far steadier than latency on a shared machine, so it is
            # the figure to compare changes by.
            cpu_ms = (cpu_seconds(gateway.pid) - cpu) * 1000 / (rps * args.route_seconds)
            print(f"/v1/route, 64 clients, {label:<12}: {rps:6.0f} requests/s, "
                  f"p50 {p50:6.1f} ms, p99 {p99:6.1f} ms, non-2xx {errors}, "
                  f"gateway CPU {cpu_ms:.2f} ms/request")
            if label == "saturation":
                saturation = rps
        raw = await asyncio.to_thread(raw_encoder_rate, args.encoder_backend)
        print(f"raw encoder, this process, {EncoderConfig().threads} threads, batches of 32, "
              f"the same prompts: {raw:.0f} texts/s; /v1/route saturation / raw: "
              f"{saturation / raw:.2f}")
    finally:
        gateway.terminate()
        upstream.terminate()
        gateway.wait(30)
        upstream.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder-backend", default=EncoderConfig().backend,
                        choices=get_args(EncoderBackend))
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--upstream-latency-ms", type=float, default=250)
    parser.add_argument("--warmup-seconds", type=float, default=3,
                        help="load before the measured calls start, at each concurrency")
    parser.add_argument("--route-seconds", type=float, default=15)
    parser.add_argument("--route-rate", type=float, default=None,
                        help="requests/s of the paced /v1/route load (default: 70 %% of "
                             "the saturation measured just before)")
    parser.add_argument("--route-only", action="store_true",
                        help="only the /v1/route part (quicker, to compare changes)")
    with_broker(run, parser.parse_args())


def with_broker(run, args) -> None:
    """``run(args, broker)`` on an embedded broker of its own."""
    broker = EmbeddedBroker(free_port())
    broker.start()
    try:
        asyncio.run(run(args, broker))
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
