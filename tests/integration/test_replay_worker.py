"""The replay worker as a real process on the real broker: one ReplayCompleted per
request through a SIGKILL mid-replay, and a shadow report whose agreement is the share
computed offline from the same prompts."""

import asyncio
import json
import shutil
import signal
import time
from pathlib import Path

import httpx
import msgspec
import pytest
from aiokafka import AIOKafkaProducer

from routemesh.contracts import (
    ReplayCompleted,
    ReplayRequested,
    RouteDecided,
    ShadowDecided,
    decode_event,
    encode_event,
)
from routemesh.contracts.topics import (
    REPLAY_REQUESTS,
    REPLAY_RESULTS,
    ROUTE_DECISIONS,
    ROUTE_SHADOW_DECISIONS,
)
from routemesh.services.router import RouteRequest, load_router
from tests.integration.conftest import (
    EXAMPLE_CONFIG,
    read_topic,
    start_gateway,
    start_service,
    wait_until_ready,
)
from tests.services.gateway.conftest import Behaviour, Served, fake_upstream

pytestmark = [pytest.mark.broker, pytest.mark.model, pytest.mark.slow]
EXAMPLES = EXAMPLE_CONFIG.parent


def workspace(tmp_path: Path, cases: int) -> Path:
    """Configs and a dataset of ``cases`` rows (the shipped set, repeated under new ids)
    for the worker to find by name; the candidate asks more of deep."""
    configs = tmp_path / "configs"
    shutil.copytree(EXAMPLES / "lite-deep", configs / "lite-deep")
    shutil.copy(EXAMPLE_CONFIG, configs)
    text = EXAMPLE_CONFIG.read_text()
    deep = text.index("id: deep")
    (configs / "candidate.yaml").write_text(
        text[:deep] + text[deep:].replace("threshold: 0.60", "threshold: 0.95", 1))
    rows = [json.loads(line) for line in EXAMPLE_CONFIG.with_suffix(".eval.jsonl")
            .read_text().splitlines() if line.strip()]
    (configs / "big.eval.jsonl").write_text("".join(
        json.dumps({**rows[i % len(rows)], "id": f"case-{i:05d}"}) + "\n"
        for i in range(cases)))
    return configs


def start_worker(settings, tmp_path: Path, configs: Path):
    return start_service("replay-worker", settings, tmp_path,
                         ROUTEMESH_ROUTER_CONFIG=str(configs / "lite-deep.yaml"),
                         ROUTEMESH_REPLAY_CONFIG_DIR=str(configs),
                         ROUTEMESH_REPLAY_INPUT_DIR=str(configs),
                         ROUTEMESH_REPLAY_REPORT_DIR=str(tmp_path / "reports"))


async def request(settings, event: ReplayRequested) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic(REPLAY_REQUESTS), encode_event(event),
                                     key=event.replay_id.encode())
    finally:
        await producer.stop()


async def results(settings, at_least: int, timeout_s: float = 240) -> list[ReplayCompleted]:
    records = await read_topic(settings, settings.topic(REPLAY_RESULTS), at_least, timeout_s)
    return [decode_event(r.value) for r in records]


async def wait_for_log(log: Path, text: str, process, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"never logged {text!r}"
        await asyncio.sleep(0.1)


async def metric(port: int, name: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(name + " ") or line.startswith(name + "{")]
    return sum(values)


async def test_one_completed_per_request_through_a_sigkill_mid_replay(settings, tmp_path):
    configs = workspace(tmp_path, 4000)
    asked = ReplayRequested(replay_id="replay-kill-1", dataset="big.eval.jsonl",
                            config="lite-deep.yaml", candidate="candidate.yaml", limit=0)
    worker, metrics, log = start_worker(settings, tmp_path, configs)
    try:
        await wait_until_ready(metrics, worker, log)
        await request(settings, asked)
        await wait_for_log(log, '"replay started"', worker)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        assert not (tmp_path / "reports" / "replay-kill-1.json").exists()
        assert await read_topic(settings, settings.topic(REPLAY_RESULTS), 1, 2) == []

        worker, metrics, log = start_worker(settings, tmp_path, configs)
        (completed,) = await results(settings, 1)
        assert completed.replay_id == "replay-kill-1"
        assert completed.status == "ok", completed.error
        assert completed.items == 4000
        assert completed.candidate_accuracy < completed.accuracy
        assert completed.report_path is None
        report = tmp_path / "reports" / completed.report_name
        assert report.is_file()
        assert (tmp_path / "reports" / "replay-kill-1.receipt.json").is_file()

        # Asked again (a retrying client), and after another restart: still one answer.
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, log.read_text()
        worker, metrics, log = start_worker(settings, tmp_path, configs)
        await wait_until_ready(metrics, worker, log)
        await request(settings, asked)
        deadline = time.monotonic() + 60
        while await metric(metrics, "routemesh_replay_worker_duplicate_requests_total") < 1:
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.2)
        assert len(await results(settings, 2, timeout_s=3)) == 1
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)


async def test_shadow_agreement_equals_the_share_computed_offline(settings, tmp_path):
    configs = workspace(tmp_path, 1)
    rows = [json.loads(line) for line in EXAMPLE_CONFIG.with_suffix(".eval.jsonl")
            .read_text().splitlines() if line.strip()]
    prompts = [row.get("messages") or [{"role": "user", "content": row["prompt"]}]
               for row in rows]
    with Served(fake_upstream(Behaviour())) as upstream:
        gateway, port, gateway_metrics, gateway_log = start_gateway(
            settings, tmp_path, f"{upstream.url}/v1", ROUTEMESH_AUTH_ENABLED="false",
            ROUTEMESH_SHADOW_CONFIG=str(configs / "candidate.yaml"),
            ROUTEMESH_EMBEDDING_CACHE_SIZE="0")
        worker, metrics, log = start_worker(settings, tmp_path, configs)
        try:
            await wait_until_ready(gateway_metrics, gateway, gateway_log)
            await wait_until_ready(metrics, worker, log)
            misses = "routemesh_gateway_embedding_cache_misses_total"
            before = await metric(gateway_metrics, misses)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                for messages in prompts:
                    response = await client.post("/v1/route", json={"messages": messages})
                    assert response.status_code == 200, response.text
                for messages in prompts[:20]:
                    response = await client.post("/v1/chat/completions",
                                                 json={"model": "auto", "messages": messages})
                    assert response.status_code == 200, response.text
            asked = len(prompts) + 20
            shadowed = await read_topic(settings, settings.topic(ROUTE_SHADOW_DECISIONS),
                                        asked)
            decided = await read_topic(settings, settings.topic(ROUTE_DECISIONS),
                                       asked + 1, timeout_s=5)
            # The decisions topic keeps its contract with a shadow config running: one
            # decision per request, every event id once; a consumer written against 1.1
            # (which ignores fields it does not know) counts each request once.
            assert len(decided) == asked
            live = [decode_event(r.value) for r in decided]
            assert {type(e) for e in live} == {RouteDecided}
            assert len({e.request_id for e in live}) == asked
            assert len({e.event_id for e in live}) == asked
            old = [msgspec.json.decode(r.value, type=RouteDecided11) for r in decided]
            assert len({e.request_id for e in old}) == len(old) == asked
            shadows = [decode_event(r.value) for r in shadowed]
            assert {type(e) for e in shadows} == {ShadowDecided}
            assert {e.live_event_id for e in shadows} == {e.event_id for e in live}
            assert not {e.event_id for e in shadows} & {e.event_id for e in live}
            # The shadow reused every vector the live decisions made.
            assert await metric(gateway_metrics, misses) - before <= len(prompts)
            await request(settings, ReplayRequested(replay_id="shadow-1", kind="shadow",
                                                    window_s=600))
            (completed,) = await results(settings, 1)
        finally:
            for process in (gateway, worker):
                process.send_signal(signal.SIGTERM)
            gateway.wait(60)
            worker.wait(60)
    live = load_router(configs / "lite-deep.yaml")
    shadow = load_router(configs / "candidate.yaml")
    requests = [RouteRequest.from_body({"messages": m}) for m in prompts]
    same = [live.decide(r, "x").route_id == shadow.decide(r, "x").route_id
            for r in requests]
    assert not all(same), "the shadow config should differ on some of these prompts"
    assert completed.status == "ok", completed.error
    assert completed.kind == "shadow"
    assert completed.items == asked
    chats = same[:20]
    assert completed.agreement == pytest.approx((sum(same) + sum(chats))
                                                / (len(same) + len(chats)))


class RouteDecided11(msgspec.Struct, kw_only=True):
    """What a consumer written against RouteDecided 1.1 decodes (unknown fields ignored)."""

    type: str
    schema_version: str
    event_id: str
    request_id: str
    route_id: str
    reason: str
