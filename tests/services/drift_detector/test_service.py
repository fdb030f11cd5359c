"""The drift detector's handler: what is saved before offsets move, what a restart
restores and skips, and that an alert computed before a crash is published once."""

import gzip
import random
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from routemesh.contracts import CompletionObserved, RouteDecided
from routemesh.services.drift_detector import Pinned
from routemesh.services.drift_detector import service as drift_service
from routemesh.services.drift_detector.detector import Detector
from routemesh.services.drift_detector.service import DriftDetector, DriftDetectorSettings
from routemesh.services.drift_detector.store import PIN_FILE
from routemesh.services.drift_detector.store import read_drift_state as read_state
from routemesh.services.runtime.changelog import CHANGELOG_MAX_RECORD_BYTES
from routemesh.services.runtime.consumer import Delivery, OffsetTracker
from routemesh.services.runtime.telemetry import Readiness
from tests.services.drift_detector.streams import START, decision, healthy

CONFIG = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "lite-deep.yaml"
OBS = "t.llm.observations.v1"


class Producer:
    def __init__(self) -> None:
        self.published = []
        self.down = False

    async def publish(self, event) -> None:
        if self.down:
            raise ConnectionError("broker unreachable")
        self.published.append(event)
        ON_THE_TOPIC.append(event)


# What the alerts topic holds in a test: every producer's confirmed alerts.
ON_THE_TOPIC: list = []


@pytest.fixture(autouse=True)
def alerts_topic(monkeypatch):
    async def recent_event_ids(settings, topic, per_partition):
        assert topic == "t.drift.alerts.v1"
        return {a.event_id for a in ON_THE_TOPIC[-per_partition:]}

    ON_THE_TOPIC.clear()
    monkeypatch.setattr(drift_service, "recent_event_ids", recent_event_ids)


class Consumer(SimpleNamespace):
    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        pass


def detector(tmp_path, producer=None, **settings) -> DriftDetector:
    offsets = OffsetTracker()
    ctx = SimpleNamespace(
        settings=DriftDetectorSettings(drift_state_dir=tmp_path / "drift", router_config=CONFIG,
                                       topic_prefix="t.", **settings),
        registry=CollectorRegistry(), readiness=Readiness(),
        producer=producer or Producer(),
        consumer=lambda topics, group_id, handler, **options: Consumer(offsets=offsets))
    return DriftDetector(ctx)


def observations(start: int, n: int, *, empty: bool = False) -> list[Delivery]:
    rng = random.Random(start)
    deliveries = []
    for i in range(start, start + n):
        view = healthy(rng, i, errors=0.0, tools=0.0, filtered=0.0, sigma=0.05,
                       empty=1.0 if empty else 0.0)
        event = CompletionObserved(request_id=f"r{i}", **msgspec.structs.asdict(view))
        deliveries.append(Delivery(event, (OBS, 0, i)))
    return deliveries


def held(service) -> int:
    return service.consumer.offsets.held_count()


async def handle(service, deliveries: list[Delivery]) -> None:
    """As the consumer does: mark each as consumed, hand the batch over."""
    for delivery in deliveries:
        service.consumer.offsets.consumed(delivery.position)
    await service.handle(deliveries, service.consumer.offsets)


async def test_offsets_move_only_once_the_state_holding_their_events_is_saved(tmp_path):
    service = detector(tmp_path, drift_snapshot_interval_s=3600)
    await service.start()
    offsets = service.consumer.offsets
    # The first batch brings a transition (out of insufficient_data): saved at once.
    await handle(service, observations(0, 10))
    assert held(service) == 0
    assert read_state(service.settings.drift_state_dir) is not None
    assert [a.verdict for a in service.ctx.producer.published] == ["none"]
    # Nothing to say and the interval not over: the batch stays held, unsaved.
    await handle(service, observations(10, 5))
    assert held(service) == 1
    assert offsets.to_commit()[(OBS, 0)] == 10
    await service.stop()
    assert held(service) == 1, "stop saves; the consumer commits on its next start"
    saved = read_state(service.settings.drift_state_dir)
    assert saved.offsets == {f"{OBS}:0": 15}


async def test_a_restart_skips_what_the_saved_state_holds_and_repeats_no_alert(tmp_path):
    first = detector(tmp_path)
    await first.start()
    await handle(first, observations(0, 30))
    await handle(first, observations(30, 30, empty=True))
    verdicts = [a.verdict for a in first.ctx.producer.published]
    assert verdicts == ["none", "severe"]
    # Killed here: the consumer had committed nothing, so everything comes again.
    second = detector(tmp_path)
    await second.start()
    await handle(second, observations(0, 60))
    assert second.ctx.producer.published == []
    await handle(second, observations(60, 40))
    assert [a.verdict for a in second.ctx.producer.published] == ["none"]
    assert second.ctx.producer.published[0].previous_verdict == "severe"


async def test_an_alert_not_published_before_a_crash_is_published_once_after(tmp_path):
    """The broker is down when the alert is due: the state (with the alert waiting) is
    saved, offsets stay where they are, the detector says it is not ready; the process
    dies; the next one publishes the alert once, and the one after that not again."""
    producer = Producer()
    first = detector(tmp_path, producer)
    await first.start()
    await handle(first, observations(0, 30))
    producer.down = True
    await handle(first, observations(30, 30, empty=True))
    waiting = read_state(first.settings.drift_state_dir).outbox
    assert [a.verdict for a in waiting] == ["severe"]
    assert held(first) == 1, "nothing moves while the alert waits"
    assert not first.ctx.readiness.snapshot()[0]
    producer.down = False
    second = detector(tmp_path, producer)
    await second.start()
    assert [a.verdict for a in producer.published] == ["none", "severe"]
    third = detector(tmp_path, producer)
    await third.start()
    assert len(producer.published) == 2, "already on the topic: not published again"


async def test_models_outside_the_config_are_judged_and_labelled_as_other(tmp_path):
    service = detector(tmp_path)
    await service.start()
    rng = random.Random(1)
    deliveries = [Delivery(CompletionObserved(
        request_id=f"r{i}", **msgspec.structs.asdict(healthy(rng, i, model=f"m{i}"))),
        (OBS, 0, i)) for i in range(12)]
    await handle(service, deliveries)
    assert {a.subject for a in service.ctx.producer.published} == {"other"}
    exposed = service.ctx.registry.get_sample_value(
        "routemesh_drift_severity", {"scope": "model", "subject": "other"})
    assert exposed == 0


async def test_a_pinned_baseline_is_picked_up_and_dropped_while_running(tmp_path):
    service = detector(tmp_path, drift_snapshot_interval_s=0.0)
    await service.start()
    rng = random.Random(2)
    pinned = Pinned(pinned_at=START, decisions=tuple(
        decision(rng, i, {"lite": 1.0}) for i in range(100)))
    (service.settings.drift_state_dir / PIN_FILE).write_bytes(msgspec.json.encode(pinned))
    service._last_check = 0.0
    deliveries = [Delivery(RouteDecided(
        request_id=f"d{i}", target_model="small-model", layer="semantic",
        **msgspec.structs.asdict(decision(rng, i, {"deep": 1.0}))),
        ("t.route.decisions.v1", 0, i)) for i in range(200)]
    await handle(service, deliveries[:1])
    assert service.detector.pinned == pinned
    await handle(service, deliveries[1:])
    shift = [a for a in service.ctx.producer.published if a.subject == "*"]
    assert shift
    assert shift[-1].verdict == "severe"
    assert shift[-1].baseline_kind == "pinned"
    (service.settings.drift_state_dir / PIN_FILE).unlink()
    service._last_check = 0.0  # as if a second had passed
    await handle(service, [])
    assert service.detector.pinned is None


def test_a_full_route_record_fits_a_kafka_message_once_compressed():
    """With the changelog store, a route's windows are one record: at the largest routing
    window allowed, with noisy figures and real hashes, it must pass the producer's size
    check and the broker's default max.message.bytes (1 MiB, of the compressed batch)."""
    window = drift_service.CHANGELOG_ROUTING_WINDOW
    judge = Detector("normal", routing_window=window)
    judge.known({"small-model"}, {"lite"})
    rng = random.Random(7)
    config = f"{rng.getrandbits(256):064x}"
    for i in range(3 * window):
        judge.add_decision(decision(rng, i, {"lite": 1.0}, config=config))
        judge.add_observation(healthy(rng, i))
    record = msgspec.msgpack.encode(judge.record("route", "lite"))
    assert len(record) > 2 * window * 100, "the windows are in the record"
    assert len(record) < CHANGELOG_MAX_RECORD_BYTES
    assert len(gzip.compress(record)) < 1024 * 1024
    with pytest.raises(ValueError, match="may be at most 5000"):
        DriftDetectorSettings(drift_state_store="changelog", drift_routing_window=window + 1)
