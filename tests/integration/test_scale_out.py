"""Consumers in groups of several instances on the real broker (6 partitions): one
instance SIGKILLed and another added while the stream flows, and still each request is
audited once, each replay answered once, and the scorers' figures and the drift
detectors' transitions are one instance's. Their state moves with their partitions: the
audit trail's files are shared, the replay answers are read back from the results topic,
the scorers' and the detectors' state from their changelogs."""

import asyncio
import json
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from routemesh.contracts import (
    OutcomeReported,
    ReplayRequested,
    decode_event,
    encode_event,
    topic_for_event,
)
from routemesh.contracts.topics import (
    DRIFT_ALERTS,
    DRIFT_INPUTS,
    LLM_OBSERVATIONS,
    ROUTE_DECISIONS,
    ROUTE_OUTCOMES,
    ROUTE_SCORES,
)
from routemesh.services.audit_writer.records import read_record
from routemesh.services.audit_writer.store import list_files, read_lines
from routemesh.services.cli.dev import drained
from routemesh.services.drift_detector import DriftDecision
from routemesh.services.drift_detector.detector import Detector
from routemesh.services.drift_detector.service import SUBJECTS_GROUP, views
from routemesh.services.router import PASSTHROUGH_ROUTE, load_config
from routemesh.services.runtime.consumer import PartitionLogs, read_records
from routemesh.services.runtime.kafka import create_topics
from routemesh.services.runtime.settings import ServiceSettings
from routemesh.services.scorer.advice import AdvicePolicy
from routemesh.services.scorer.ledger import Ledger
from routemesh.services.scorer.service import ScorerSettings
from tests.integration.conftest import (
    CLI,
    EXAMPLE_CONFIG,
    cli_env,
    start_service,
    wait_until_ready,
)
from tests.integration.test_replay_worker import request, results, workspace
from tests.services.audit_writer.helpers import decision, observation
from tests.services.scorer import events as scored
from tests.services.scorer.test_ledger import feed

pytestmark = [pytest.mark.broker, pytest.mark.slow]
REQUESTS = 20_000


@pytest.fixture
async def settings(own_broker) -> ServiceSettings:
    """A broker of these tests' own: the embedded broker may keep a SIGKILLed member as
    its group's leader, and later tests use the same consumer groups."""
    configured = ServiceSettings(kafka_bootstrap_servers=own_broker.bootstrap,
                                 kafka_idempotent_producer=False, metrics_port=0)
    await create_topics(configured)
    return configured


class Group:
    """Instances of one service in one consumer group, each with its own log."""

    def __init__(self, name: str, settings, tmp_path: Path, **env: str) -> None:
        self.name, self.settings, self.tmp_path, self.env = name, settings, tmp_path, env
        self.instances: list[tuple[subprocess.Popen, int, Path]] = []

    def add(self) -> tuple[subprocess.Popen, int, Path]:
        n = len(self.instances) + 1
        home = self.tmp_path / f"{self.name}-{n}"
        home.mkdir()
        started = start_service(self.name, self.settings, home,
                                ROUTEMESH_INSTANCE_ID=f"{self.name}-{n}", **self.env)
        self.instances.append(started)
        return started

    def live(self) -> list[tuple[subprocess.Popen, int, Path]]:
        return [i for i in self.instances if i[0].poll() is None]

    async def ready(self) -> None:
        for process, metrics, log in self.live():
            await wait_until_ready(metrics, process, log, timeout_s=240)

    async def idle(self, timeout_s: float = 120) -> None:
        """Until the live instances have read every partition to the end the broker
        holds (as `routemesh dev` drains) and hold nothing."""
        deadline = time.monotonic() + timeout_s
        urls = [f"http://127.0.0.1:{m}/metrics" for _, m, _ in self.live()]
        assert await drained(urls, PartitionLogs(self.settings), timeout_s)
        while held := sum([await metric_sum(m, "routemesh_consumer_held_events")
                           for _, m, _ in self.live()]):
            assert time.monotonic() < deadline, held
            await asyncio.sleep(0.5)

    async def replace_one_mid_save(self, saves: str, stream: Awaitable[None]) -> None:
        """SIGKILL the first instance once it has saved its state (``saves``: the save
        histogram's count) 20 times more while ``stream`` is sent, so the kill lands
        between a save and its commit; add another; return once the stream is sent."""
        killed, metrics, _ = self.instances[0]
        before = await metric_sum(metrics, saves)
        producing = asyncio.ensure_future(stream)
        while await metric_sum(metrics, saves) < before + 20:
            await asyncio.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        self.add()
        await producing

    def logged(self, message: str) -> list[dict]:
        """Every instance's log lines saying ``message``."""
        return [entry for _, _, log in self.instances
                for line in log.read_text().splitlines() if line.startswith("{")
                if (entry := json.loads(line)).get("message") == message]

    def stop(self) -> None:
        for process, _, _ in self.live():
            process.send_signal(signal.SIGTERM)
        for process, _, log in self.instances:
            if process.poll() is None:
                assert process.wait(60) == 0, log.read_text()[-2000:]


async def metric_sum(port: int, name: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


async def stream(settings, ids: range, kinds=("decision", "observation", "outcome")) -> None:
    """Events of requests ``ids``, keyed by request id as the gateway keys them."""
    now = datetime.now(UTC)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                linger_ms=5)
    await producer.start()
    try:
        for i in ids:
            request_id = f"req-{i:05d}"
            events = {"decision": (ROUTE_DECISIONS, decision(request_id, now)),
                      "observation": (LLM_OBSERVATIONS, observation(request_id, now)),
                      "outcome": (ROUTE_OUTCOMES, OutcomeReported(request_id=request_id,
                                                                  completed=True))}
            for kind in kinds:
                topic, event = events[kind]
                await producer.send(settings.topic(topic), encode_event(event),
                                    key=request_id.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def test_audit_writers_write_each_request_once_through_a_kill_and_a_join(
    settings, tmp_path
):
    audit_dir = tmp_path / "audit"
    writers = Group("audit-writer", settings, tmp_path, ROUTEMESH_AUDIT_DIR=str(audit_dir),
                    ROUTEMESH_AUDIT_JOIN_WINDOW_S="30")
    for _ in range(3):
        writers.add()
    def records():
        return [read_record(line) for f in list_files(audit_dir) for _, line in read_lines(f)]

    async def written(at_least: int) -> None:
        while sum(1 for f in list_files(audit_dir) for _ in read_lines(f)) < at_least:
            await asyncio.sleep(0.1)

    late = range(60)
    try:
        await writers.ready()
        # The first requests' observations come late: their decisions wait in the join
        # windows, so no writer can commit past them while it writes everything after.
        await stream(settings, late, ("decision", "outcome"))
        await stream(settings, range(len(late), REQUESTS // 2))
        await written(REQUESTS // 2 - len(late) + (REQUESTS // 2))
        # Killed then, its partitions' next owners get all that again.
        killed = writers.instances[0][0]
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        producing = asyncio.create_task(stream(settings, range(REQUESTS // 2, REQUESTS)))
        await written(REQUESTS)
        writers.add()
        await producing
        await stream(settings, late, ("observation",))
        await writers.ready()
        deadline = time.monotonic() + 300
        while len({r.request_id for r in records() if r.join == "joined"}) < REQUESTS:
            assert time.monotonic() < deadline, "not every request was joined"
            await asyncio.sleep(1)
        await writers.idle()
    finally:
        writers.stop()

    found = records()
    primary = Counter(r.request_id for r in found if r.primary)
    outcomes = Counter(r.request_id for r in found if r.join == "outcome")
    assert len(primary) == REQUESTS
    assert primary.most_common(1)[0][1] == 1, primary.most_common(3)
    assert len(outcomes) == REQUESTS
    assert outcomes.most_common(1)[0][1] == 1, outcomes.most_common(3)
    assert {r.join for r in found} == {"joined", "outcome"}, (
        "a request's events met in one writer however its partition moved")
    partitions = {f.partition for f in list_files(audit_dir)}
    assert partitions == set(range(6)), "each partition's own files"
    verify = subprocess.run([*CLI, "audit", "verify", "--dir", str(audit_dir)],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    took_over = writers.logged("audit index read for assigned partitions")
    assert any(line["records"] > 0 for line in took_over), (
        "a writer took over a partition another had written")


@pytest.mark.model
async def test_replay_workers_answer_each_replay_once_through_a_kill_and_a_join(
    settings, tmp_path
):
    configs = workspace(tmp_path, 50)
    workers = Group("replay-worker", settings, tmp_path,
                    ROUTEMESH_ROUTER_CONFIG=str(configs / "lite-deep.yaml"),
                    ROUTEMESH_REPLAY_CONFIG_DIR=str(configs),
                    ROUTEMESH_REPLAY_INPUT_DIR=str(configs),
                    ROUTEMESH_REPLAY_REPORT_DIR=str(tmp_path / "reports"))
    for _ in range(3):
        workers.add()

    def asked(n: int) -> ReplayRequested:
        return ReplayRequested(replay_id=f"replay-{n:02d}", dataset="big.eval.jsonl",
                               config="lite-deep.yaml")

    try:
        await workers.ready()
        for n in range(6):
            await request(settings, asked(n))
        assert len(await results(settings, 6)) == 6
        killed = workers.instances[0][0]
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        workers.add()
        await workers.ready()
        # Every request again (clients retrying), to whichever instance owns its
        # partition now, and six new ones.
        for n in range(12):
            await request(settings, asked(n))
        await results(settings, 12)
        deadline = time.monotonic() + 120
        while sum([await metric_sum(m, "routemesh_replay_worker_duplicate_requests_total")
                   for _, m, _ in workers.live()]) < 6:
            assert time.monotonic() < deadline, "the retries were not all refused"
            await asyncio.sleep(0.5)
        await workers.idle()
        answered = await results(settings, 13, timeout_s=3)
    finally:
        workers.stop()
    assert sorted(c.replay_id for c in answered) == [asked(n).replay_id for n in range(12)]
    assert {c.status for c in answered} == {"ok"}
    reports = {p.name for p in (tmp_path / "reports").glob("replay-??.json")}
    assert reports == {f"{asked(n).replay_id}.json" for n in range(12)}, (
        "the instances share one report directory")


def scored_traffic(ids: range, at: datetime) -> list:
    """Decisions, observations and outcomes of requests ``ids`` with figures to get
    right: two routes, scores around the thresholds, most outcomes naming a route."""
    rng = random.Random(11)
    events = []
    for i in ids:
        rid = f"req-{i:05d}"
        decided_ = scored.decided(rid, rng.choice(["lite", "deep"]), rng.uniform(0.3, 1.0),
                                  at=at, latency_ms=rng.uniform(1, 60))
        events += [decided_, scored.observed(rid, decided_.route_id, at=at)]
        if rng.random() < 0.8:
            truth = rng.choice(["lite", "deep"])
            events.append(scored.outcome(rid, truth, correct=truth == decided_.route_id,
                                         at=at))
    return events


async def send(settings, events) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                linger_ms=5)
    await producer.start()
    try:
        for event in events:
            await producer.send(settings.topic(topic_for_event(type(event))),
                                encode_event(event), key=event.request_id.encode())
        await producer.flush()
    finally:
        await producer.stop()


def comparable(scores) -> dict:
    """The published figures, to 3 decimals."""
    def r(x):
        return None if x is None else round(x, 3)
    return {
        "all": (scores.decisions, scores.outcomes, scores.correct, r(scores.accuracy),
                r(scores.low_confidence_rate), r(scores.p95_decision_latency_ms)),
        "routes": [(s.route_id, s.decisions, s.outcomes, s.correct, r(s.accuracy),
                    r(s.capture_rate), r(s.mean_confidence), r(s.p95_decision_latency_ms),
                    s.threshold_too_high, s.threshold_too_low) for s in scores.routes],
        "layers": [(s.layer, s.decisions, s.outcomes, r(s.accuracy)) for s in scores.layers],
        "advice": [(a.route_id, a.samples, a.recommended_threshold)
                   for a in scores.recommendations],
    }


async def test_scorers_publish_one_instance_figures_through_a_kill_and_a_join(
    settings, tmp_path
):
    config = Path(__file__).parents[2] / "deploy" / "examples" / "lite-deep.yaml"
    scorers = Group("scorer", settings, tmp_path, ROUTEMESH_SCORER_STATE_STORE="changelog",
                    ROUTEMESH_ROUTER_CONFIG=str(config),
                    # Small batches, each saved: a kill lands between a save and its commit.
                    ROUTEMESH_SCORER_SNAPSHOT_INTERVAL_S="0",
                    ROUTEMESH_SCORER_BATCH_MAX_RECORDS="50",
                    ROUTEMESH_SCORER_PUBLISH_INTERVAL_S="3600",
                    ROUTEMESH_SCORER_MIN_SAMPLES="20")
    now = datetime.now(UTC)
    events = scored_traffic(range(REQUESTS), now)
    half = len(events) // 2
    # One scorer fed every event: what the group must publish.
    alone = Ledger(ScorerSettings(router_config=config).limits())
    loaded = load_config(config)
    alone.configure({r.id: r.threshold for r in loaded.config.routes},
                    loaded.config.default_route, loaded.sha256)
    feed(alone, events)
    expected = comparable(alone.scores(now, timedelta(hours=24), AdvicePolicy.of(False, 20)))

    async def published() -> list:
        found = []
        async for record in read_records(settings, settings.topic(ROUTE_SCORES),
                                         from_beginning=True, idle_s=1.0):
            scores = decode_event(record.value)
            if scores.window_seconds == 24 * 3600:
                found.append(scores)
        return found

    for _ in range(3):
        scorers.add()
    try:
        await scorers.ready()
        await send(settings, events[:half])
        await scorers.idle()
        # Killed while it counts, saves and commits the second half, so what it saved
        # last may be past what it committed: its partitions' next owners get that again
        # and must count it once.
        await scorers.replace_one_mid_save("routemesh_scorer_state_save_seconds_count",
                                           send(settings, events[half:]))
        await scorers.ready()
        await scorers.idle(timeout_s=300)
        deadline = time.monotonic() + 120
        while True:
            for process, _, _ in scorers.live():
                process.send_signal(signal.SIGUSR1)
            newest = await published()
            if newest and newest[-1].decisions >= REQUESTS:
                break
            assert time.monotonic() < deadline, newest[-1:] or "nothing published"
            await asyncio.sleep(1)
        exporting = [m for _, m, _ in scorers.live()
                     if await metric_sum(m, "routemesh_scorer_decisions") > 0]
        duplicates = [await metric_sum(m, "routemesh_scorer_duplicate_outcomes")
                      for _, m, _ in scorers.live()]
    finally:
        scorers.stop()

    assert comparable(newest[-1]) == expected
    assert len(exporting) == 1, "one instance publishes and exports the figures"
    assert duplicates == [0.0] * len(duplicates), (
        "what a scorer saved and did not commit was delivered again and counted once")
    restored = scorers.logged("scorer state restored from the changelog")
    assert any(line["pending"] > 0 for line in restored), (
        "a scorer took over a partition another had counted")
    advice = subprocess.run(
        [*CLI, "tune", "--config", str(config), "--from-scores", "--changelog",
         "--window-h", "24", "--min-samples", "20"],
        capture_output=True, text=True, timeout=120, env=cli_env(settings))
    assert advice.returncode == 0, advice.stdout + advice.stderr
    assert f"({expected['all'][1]} outcomes)" in advice.stdout, (
        "the tool reads the evidence the group keeps on the changelog")


def drift_phase(ids: range, route: str, failing: bool, at: datetime) -> list:
    """A decision and an observation per request, all alike: a route served by its
    model, healthy or failing. Alike, so the order in which the partitions interleave
    them changes no window, and the group's transitions are one instance's."""
    target = {r.id: r.target_model for r in load_config(EXAMPLE_CONFIG).config.routes}
    answer = ({"upstream_status": 503, "completion_tokens": None, "error_class": "upstream_5xx"}
              if failing else {"completion_tokens": 200, "finish_reason": "stop"})
    return [event for i in ids
            for event in (decision(f"req-{i:05d}", at, route_id=route,
                                   target_model=target[route]),
                          observation(f"req-{i:05d}", at, route_id=route,
                                      target_model=target[route], **answer))]


async def committed(settings, group: str, topic: str) -> int:
    """The sum of ``group``'s committed offsets on ``topic``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers,
                                group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(DRIFT_INPUTS.partitions)]
        return sum([await consumer.committed(tp) or 0 for tp in partitions])
    finally:
        await consumer.stop()


async def test_drift_detectors_report_one_instance_transitions_through_a_kill_and_a_join(
    settings, tmp_path
):
    detectors = Group("drift-detector", settings, tmp_path,
                      ROUTEMESH_DRIFT_STATE_STORE="changelog",
                      ROUTEMESH_DRIFT_STATE_DIR=str(tmp_path / "drift"),
                      ROUTEMESH_ROUTER_CONFIG=str(EXAMPLE_CONFIG),
                      ROUTEMESH_DRIFT_ROUTING_WINDOW="200",
                      # Small batches, each saved: a kill lands between a save and its
                      # commit.
                      ROUTEMESH_DRIFT_SNAPSHOT_INTERVAL_S="0",
                      ROUTEMESH_DRIFT_BATCH_MAX_RECORDS="50")
    now = datetime.now(UTC)
    healthy = drift_phase(range(REQUESTS // 2), "lite", False, now)
    failing = drift_phase(range(REQUESTS // 2, REQUESTS), "deep", True, now)
    # One detector fed every event: what the group must report.
    alone = Detector("normal", routing_window=200)
    routes = load_config(EXAMPLE_CONFIG).config.routes
    alone.known({r.target_model for r in routes}, {r.id for r in routes} | {PASSTHROUGH_ROUTE})
    expected = set()
    for event in healthy + failing:
        view, attempts = views(event)
        found = (alone.add_decision(view) if isinstance(view, DriftDecision)
                 else alone.add_observation(view, attempts))
        expected |= {transition.identity for transition in found}
    inputs = settings.topic(DRIFT_INPUTS)
    # Every decision feeds its route and all routing, every observation its model and
    # its route.
    copies = 4 * (REQUESTS // 2)

    async def reported() -> list:
        return [decode_event(record.value).event_id async for record in read_records(
            settings, settings.topic(DRIFT_ALERTS), from_beginning=True, idle_s=1.0)]

    for _ in range(3):
        detectors.add()
    try:
        await detectors.ready()
        await send(settings, healthy)
        # The failing half starts once the healthy one is judged everywhere.
        deadline = time.monotonic() + 300
        while await committed(settings, SUBJECTS_GROUP, inputs) < copies:
            assert time.monotonic() < deadline, "the healthy half was not judged"
            await asyncio.sleep(0.5)
        await detectors.replace_one_mid_save("routemesh_drift_state_save_seconds_count",
                                             send(settings, failing))
        await detectors.ready()
        deadline = time.monotonic() + 300
        while set(alerts := await reported()) != expected:
            assert time.monotonic() < deadline, (len(set(alerts)), len(expected))
            await asyncio.sleep(1)
        await detectors.idle(timeout_s=300)
        alerts = await reported()
        severities = [await metric_sum(m, "routemesh_drift_severity")
                      for _, m, _ in detectors.live()]
    finally:
        detectors.stop()

    assert set(alerts) == expected
    assert len(expected) >= 5, "the stream has transitions to get right"
    assert len(severities) == 3
    restored = detectors.logged("drift state restored from the changelog")
    assert any(line["subjects"] > 0 for line in restored), (
        "a detector took over subjects another had judged")
