"""Proxy overhead next to the LiteLLM proxy, in one run, against the same fake upstream.

    python bench/peer_litellm.py [--requests 600] [--litellm-venv bench/.litellm-venv]

One run: the embedded broker, the fake OpenAI-compatible upstream (bench/fake_upstream.py,
answering at once), `routemesh serve gateway` (lite-deep, the local float MiniLM, the
embedding cache off, events published to Kafka) and the LiteLLM proxy (its own venv, made
on first run; one worker; one model entry pointing at the same upstream, no routing).
Every figure is a chat completion (non-streaming) with the lite-deep eval prompts, at
concurrency 1 and 16, of the calls after 3 s of the same load. Overhead = proxy latency
minus a direct call to the upstream, measured in the same run. Also the encoder's
single-text latency on the same prompts (in this process, before the load), since a
routemesh request pays for one encode that LiteLLM does not do.

Targets: routemesh's overhead / LiteLLM's <= 0.5 at concurrency 1 and <= 0.2 at 16;
chat overhead p50 at concurrency 1 minus the encoder's single-text p50 <= 2 ms.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway import (
    HERE,
    PROMPTS,
    chat,
    start_gateway,
    timed_calls,
    wait_ready,
    with_broker,
)
from peer_venv import peer_python

from routemesh.services.router.encoders import LocalEncoder
from routemesh.services.runtime.embedded_broker import EmbeddedBroker, free_port
from routemesh.services.runtime.stats import Percentiles

# The newest release whose proxy extra resolves from PyPI (later ones need packages
# that are not published there).
LITELLM = "litellm[proxy]==1.108.5"
CONFIG = """\
model_list:
  - model_name: auto
    litellm_params:
      model: openai/small-model
      api_base: http://127.0.0.1:{port}/v1
      api_key: sk-bench
litellm_settings:
  telemetry: false
  drop_params: true
"""


def encoder_latency_ms() -> Percentiles:
    """The float MiniLM's latency for one text, each prompt alone."""
    encoder = LocalEncoder("onnx")
    for prompt in PROMPTS[:20]:
        encoder.encode([prompt])
    timings = []
    for prompt in PROMPTS:
        started = time.perf_counter()
        encoder.encode([prompt])
        timings.append((time.perf_counter() - started) * 1000)
    return Percentiles.of(timings)


def _f(p: Percentiles) -> str:
    return f"{p.p50:6.1f}/{p.p95:6.1f}/{p.p99:6.1f}"


async def run(args, broker: EmbeddedBroker) -> None:
    encoder = encoder_latency_ms()
    python = peer_python(args.litellm_venv, [LITELLM])
    work = Path(tempfile.mkdtemp(prefix="routemesh-bench-litellm-"))
    upstream_port, litellm_port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, str(HERE / "fake_upstream.py"),
                                 str(upstream_port)])
    (work / "litellm.yaml").write_text(CONFIG.format(port=upstream_port))
    litellm = subprocess.Popen(
        [str(python), "-m", "litellm.proxy.proxy_cli", "--config", str(work / "litellm.yaml"),
         "--host", "127.0.0.1", "--port", str(litellm_port), "--num_workers", "1"],
        # No inbound auth on either side (the gateway runs with it off here too).
        env=dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR",
                 LITELLM_TELEMETRY="False",
                 LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true"),
        stdout=subprocess.DEVNULL, stderr=(work / "litellm.log").open("wb"))
    gateway, gateway_port, metrics_port = start_gateway(work, broker, upstream_port, "onnx")
    try:
        await wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", gateway)
        await wait_ready(f"http://127.0.0.1:{litellm_port}/health/liveliness", litellm)
        bases = {"direct": f"http://127.0.0.1:{upstream_port}/v1",
                 "routemesh": f"http://127.0.0.1:{gateway_port}/v1",
                 "litellm": f"http://127.0.0.1:{litellm_port}/v1"}
        for base in bases.values():
            await timed_calls(base, "/chat/completions", 4, 50, False, chat)
        print(f"{len(PROMPTS)} prompts; encoder single text p50/p95/p99 ms {_f(encoder)}")
        print(f"{'conc':>4}  {'direct p50/p95/p99':>20}  {'routemesh overhead':>20}  "
              f"{'LiteLLM overhead':>20}  {'ratio p50':>9}")
        for concurrency in (1, 16):
            latency = {}
            for name, base in bases.items():
                _, latency[name] = await timed_calls(
                    base, "/chat/completions", concurrency, args.requests, False, chat, 3)
            d = Percentiles.of(latency["direct"])
            over = {}
            for name in ("routemesh", "litellm"):
                g = Percentiles.of(latency[name])
                over[name] = Percentiles(p50=g.p50 - d.p50, p95=g.p95 - d.p95,
                                         p99=g.p99 - d.p99)
            ratio = over["routemesh"].p50 / over["litellm"].p50
            print(f"{concurrency:>4}  {_f(d):>20}  {_f(over['routemesh']):>20}  "
                  f"{_f(over['litellm']):>20}  {ratio:9.2f}", flush=True)
            if concurrency == 1:
                print(f"      routemesh overhead p50 minus the encoder's: "
                      f"{over['routemesh'].p50 - encoder.p50:.1f} ms")
    finally:
        for process in (gateway, litellm, upstream):
            process.terminate()
        for process in (gateway, litellm, upstream):
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--litellm-venv", type=Path, default=HERE / ".litellm-venv")
    with_broker(run, parser.parse_args())


if __name__ == "__main__":
    main()
