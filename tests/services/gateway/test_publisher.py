"""The publisher across an outage and a restart, with a stand-in broker object."""

import asyncio

from prometheus_client import CollectorRegistry

from routemesh.contracts import OutcomeReported, decode_event
from routemesh.services.gateway.publisher import EventPublisher
from routemesh.services.gateway.spool import Spool
from routemesh.services.runtime.settings import ServiceSettings


class StandInBroker:
    """Records what it is asked to publish; refuses everything while ``down``."""

    def __init__(self, down: bool) -> None:
        self.down = down
        self.published: list[str] = []

    async def publish(self, message, topic, key=None, headers=None):
        await asyncio.sleep(0)
        if self.down:
            raise ConnectionError("broker unreachable")
        self.published.append(decode_event(message).request_id)


def event(i: int) -> OutcomeReported:
    return OutcomeReported(request_id=f"r{i:03d}", completed=True)


async def test_an_outage_and_a_restart_lose_nothing_and_keep_the_order(tmp_path):
    settings = ServiceSettings()
    down = StandInBroker(down=True)
    first = EventPublisher(down, settings, CollectorRegistry(), maxsize=5, concurrency=2,
                           spool=Spool(tmp_path))
    await first.start()
    for i in range(30):
        first.offer(event(i))
        await asyncio.sleep(0)
    assert first.spool.pending_bytes > 0, "the full queue spilled to disk"
    await first.drain(timeout_s=0.2)
    assert down.published == []

    up = StandInBroker(down=False)
    second = EventPublisher(up, settings, CollectorRegistry(), maxsize=5, concurrency=2,
                            spool=Spool(tmp_path))
    await second.start()
    second.offer(event(30))
    async with asyncio.timeout(10):
        while len(up.published) < 31:
            await asyncio.sleep(0.01)
    await second.drain(timeout_s=1)
    assert up.published == [f"r{i:03d}" for i in range(31)]
    assert Spool(tmp_path).pending_bytes == 0


async def test_without_a_spool_a_full_queue_drops_and_counts(tmp_path):
    registry = CollectorRegistry()
    publisher = EventPublisher(StandInBroker(down=True), ServiceSettings(), registry,
                               maxsize=3)
    for i in range(5):
        publisher.offer(event(i))
    assert registry.get_sample_value("routemesh_gateway_publish_dropped_total") == 2
