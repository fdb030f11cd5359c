"""The replay worker's handling without a broker: requests that name files it must not
or cannot read are answered as failed with the reason; a request is held until its
answer is published, and asked twice it is answered once; a replay whose partition is
revoked while it runs is not answered by this instance."""

import asyncio
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from routemesh.contracts import ReplayRequested, RouteBankPublished
from routemesh.services.replay_worker.service import (
    ReplayWorker,
    ReplayWorkerSettings,
    completed_event_id,
)
from routemesh.services.router import build_route_bank, load_config, open_qdrant
from routemesh.services.runtime.consumer import Delivery, OffsetTracker
from routemesh.services.runtime.telemetry import Readiness

EXAMPLES = Path(__file__).resolve().parents[3] / "deploy" / "examples"


class Producer:
    def __init__(self) -> None:
        self.published = []

    async def publish(self, event) -> None:
        self.published.append(event)


def worker(tmp_path, **settings) -> ReplayWorker:
    settings.setdefault("router_config", EXAMPLES / "lite-deep.yaml")
    ctx = SimpleNamespace(
        settings=ReplayWorkerSettings(replay_report_dir=tmp_path / "reports", **settings),
        registry=CollectorRegistry(), readiness=Readiness(), producer=Producer(),
        consumer=lambda topics, group_id, handler, **options: SimpleNamespace())
    return ReplayWorker(ctx)


async def test_names_with_a_path_or_of_missing_files_fail_with_the_reason(tmp_path):
    replay = worker(tmp_path)
    cases = {
        "path": ReplayRequested(replay_id="a", dataset="lite-deep.eval.jsonl",
                                config="../secrets.yaml"),
        "missing": ReplayRequested(replay_id="b", dataset="nothing-here.jsonl"),
        "candidate": ReplayRequested(replay_id="c", dataset="lite-deep.eval.jsonl",
                                     candidate="/etc/passwd"),
        "dataset": ReplayRequested(replay_id="d", dataset="../examples/lite-deep.eval.jsonl"),
    }
    answers = {name: (await replay._run(request)).completed
               for name, request in cases.items()}
    assert {a.status for a in answers.values()} == {"failed"}
    assert "'../secrets.yaml' is no file name" in answers["path"].error
    assert "no dataset named 'nothing-here.jsonl'" in answers["missing"].error
    assert "'/etc/passwd' is no file name" in answers["candidate"].error
    assert "'../examples/lite-deep.eval.jsonl' is no file name" in answers["dataset"].error
    assert answers["path"].event_id == completed_event_id("a")
    assert [p for p in (tmp_path / "reports").rglob("*") if p.is_file()] == []


async def test_a_request_is_held_until_answered_and_answered_once(tmp_path):
    replay = worker(tmp_path)
    offsets = OffsetTracker()
    asked = ReplayRequested(replay_id="x", dataset="nothing-here.jsonl")
    batch = [Delivery(asked, ("t.replay.requests.v1", 0, 0)),
             Delivery(asked, ("t.replay.requests.v1", 0, 1))]
    for delivery in batch:
        offsets.consumed(delivery.position)
    await replay.handle(batch, offsets)
    assert offsets.to_commit() == {("t.replay.requests.v1", 0): 0}
    while not replay.job.done():
        await asyncio.sleep(0.01)
    await replay.handle([], offsets)
    (answer,) = replay.ctx.producer.published
    assert (answer.replay_id, answer.status) == ("x", "failed")
    assert offsets.to_commit() == {("t.replay.requests.v1", 0): 2}
    again = Delivery(asked, ("t.replay.requests.v1", 0, 2))
    offsets.consumed(again.position)
    await replay.handle([again], offsets)
    assert replay.job is None
    assert len(replay.ctx.producer.published) == 1


def staging(replay: ReplayWorker, release: asyncio.Event):
    """A replay that writes its report and waits for ``release`` before it returns."""
    loop = asyncio.get_running_loop()

    def replayed(request, staged):
        (staged / f"{request.replay_id}.json").write_text("{}")
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
        return replay._completed(request, status="ok", report_name=f"{request.replay_id}.json")
    return replayed


async def running(tmp_path, replay_id: str, partition: int):
    """A worker running one replay (``staging``'s) of a request from ``partition``."""
    replay = worker(tmp_path)
    release = asyncio.Event()
    replay._replay = staging(replay, release)
    offsets = OffsetTracker()
    delivery = Delivery(ReplayRequested(replay_id=replay_id, dataset="d.jsonl"),
                        ("t.replay.requests.v1", partition, 0))
    offsets.consumed(delivery.position)
    await replay.handle([delivery], offsets)
    return replay, release, offsets


async def test_a_report_reaches_the_report_directory_with_its_answer(tmp_path):
    replay, release, offsets = await running(tmp_path, "y", 0)
    reports = tmp_path / "reports"
    while not list((reports / ".staging").glob("*/y.json")):
        await asyncio.sleep(0.01)
    assert not (reports / "y.json").exists(), "a report appears only with its answer"
    release.set()
    while not replay.job.done():
        await asyncio.sleep(0.01)
    await replay.handle([], offsets)
    assert [a.replay_id for a in replay.ctx.producer.published] == ["y"]
    assert (reports / "y.json").read_text() == "{}"
    assert list((reports / ".staging").iterdir()) == []


async def test_a_replay_whose_partition_is_revoked_is_left_to_its_next_owner(tmp_path):
    replay, release, offsets = await running(tmp_path, "z", 3)
    job = replay.job
    replay.revoked({("t.replay.requests.v1", 3)})
    release.set()
    while not job.done():
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)  # the done callbacks
    await replay.handle([], offsets)
    assert replay.ctx.producer.published == []
    reports = tmp_path / "reports"
    assert [p for p in reports.rglob("*") if p.is_file()] == [], (
        "the next owner writes the report")


async def test_a_starting_worker_clears_staged_reports_of_replays_long_dead(tmp_path):
    replay = worker(tmp_path)
    replay.consumer = SimpleNamespace(start=lambda: asyncio.sleep(0))
    staging = tmp_path / "reports" / ".staging"
    dead, running = staging / "dead", staging / "running"
    for staged in (dead, running):
        staged.mkdir(parents=True)
        (staged / "r.json").write_text("{}")
    long_ago = time.time() - 2 * 24 * 3600
    os.utime(dead, (long_ago, long_ago))
    await replay.start()
    assert sorted(p.name for p in staging.iterdir()) == ["running"]


def test_scheduled_learning_needs_both_directories(tmp_path):
    with pytest.raises(ValidationError, match="ROUTEMESH_REPLAY_LEARN_AUDIT_DIR"):
        ReplayWorkerSettings(replay_learn_every_s=3600, replay_learn_captures_dir=tmp_path)
    assert ReplayWorkerSettings().replay_learn_every_s == 0, "nothing learns by default"


@pytest.mark.model
async def test_scheduled_learning_writes_and_announces_a_bank_that_passes_once(tmp_path):
    config = EXAMPLES / "multi-route.yaml"
    rows = [json.loads(line) for line in
            (EXAMPLES / "multi-route.eval.jsonl").read_text().splitlines()]
    chosen = [row for route in sorted({r["route"] for r in rows})
              for row in [r for r in rows if r["route"] == route][:3]]
    audit, captures = tmp_path / "audit", tmp_path / "captures"
    audit.mkdir()
    captures.mkdir()
    (audit / "2026-12-04.jsonl").write_text("".join(json.dumps({
        "request_id": f"r{n}", "outcome": {"occurred_at": "2026-12-04T10:00:00Z",
                                           "expected_route": row["route"]}}) + "\n"
        for n, row in enumerate(chosen)))
    (captures / "2026-12-04.jsonl").write_text("".join(json.dumps({
        "request_id": f"r{n}", "messages": [["user", row["prompt"]]]}) + "\n"
        for n, row in enumerate(chosen)))
    build_route_bank(load_config(config), open_qdrant(None, tmp_path / "q"))
    replay = worker(tmp_path, router_config=config, qdrant_path=tmp_path / "q",
                    replay_learn_every_s=3600, replay_learn_audit_dir=audit,
                    replay_learn_captures_dir=captures, replay_learn_dir=tmp_path / "learn")

    done = await replay.learn_once()
    (event,) = replay.ctx.producer.published
    assert isinstance(event, RouteBankPublished)
    assert event.route_bank_sha256 == done.receipt.route_bank_sha256_after
    assert json.loads(done.receipt_path.read_text())["announced"] is True
    again = await replay.learn_once()
    assert again.receipt.unchanged, "the same batch twice writes and announces once"
    assert len(replay.ctx.producer.published) == 1
    samples = {result: replay.ctx.registry.get_sample_value(
        "routemesh_replay_worker_learns_total", {"result": result})
        for result in ("written", "unchanged")}
    assert samples == {"written": 1.0, "unchanged": 1.0}


async def test_only_the_holder_of_the_first_partition_learns_on_schedule(tmp_path):
    replay = worker(tmp_path, replay_learn_every_s=0.01, replay_learn_audit_dir=tmp_path,
                    replay_learn_captures_dir=tmp_path)
    learned, asked = asyncio.Event(), []
    leads = replay.leads

    def counted() -> bool:
        asked.append(leads())
        return asked[-1]

    async def learn_once():
        learned.set()

    replay.leads, replay.learn_once = counted, learn_once
    replay.partitions = {("t.replay.requests.v1", 1)}
    schedule = asyncio.create_task(replay._learn_on_schedule())
    try:
        while len(asked) < 3:
            await asyncio.sleep(0.01)
        assert not learned.is_set(), "another instance holds partition 0"
        replay.partitions |= {("t.replay.requests.v1", 0)}
        await asyncio.wait_for(learned.wait(), 10)
    finally:
        schedule.cancel()
    assert asked[:3] == [False, False, False]
