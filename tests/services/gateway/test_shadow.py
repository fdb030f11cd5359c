"""The shadow decider: each request decided again with a candidate config, off the
request path, published as a shadow decision; bounded, and reusing the embedding."""

from prometheus_client import CollectorRegistry, Counter

from routemesh.contracts import ShadowDecided
from routemesh.services.gateway.app import _Metrics
from routemesh.services.gateway.shadow import Shadow
from routemesh.services.router import CachingEncoder, RouteRequest, load_config, load_router
from tests.services.gateway.conftest import CollectingPublisher
from tests.services.router.conftest import CONFIG, DEEP, HashingEncoder


def _counter(registry: CollectorRegistry) -> Counter:
    return _Metrics(registry).shadow


def _routers(tmp_path):
    (tmp_path / "deep.txt").write_text(DEEP)
    (tmp_path / "live.yaml").write_text(CONFIG)
    # The shadow asks more of deep: what it is less sure of falls back to lite.
    (tmp_path / "shadow.yaml").write_text(CONFIG.replace("threshold: 0.45",
                                                         "threshold: 0.99"))
    inner = HashingEncoder()
    encoder = CachingEncoder(inner, 64)
    live = load_router(load_config(tmp_path / "live.yaml"), encoder=encoder)
    shadow = load_router(load_config(tmp_path / "shadow.yaml"), current=live)
    return inner, live, shadow


async def test_a_shadow_decision_is_published_apart_and_reuses_the_vector(tmp_path):
    inner, live, shadow_router = _routers(tmp_path)
    assert shadow_router.encoder is live.encoder
    publisher = CollectingPublisher()
    registry = CollectorRegistry()
    shadow = Shadow(shadow_router, publisher, _counter(registry), queue_size=8)
    await shadow.start()
    try:
        request = RouteRequest.from_text("translate the python function")
        before = len(inner.calls)
        decision = await live.adecide(request, "req-1")
        shadow.offer(request, decision)
        await shadow.join()
    finally:
        await shadow.stop()
        await live.aclose()
    assert len(inner.calls) == before + 1, "the shadow encoded the text again"
    (published,) = publisher.events
    assert isinstance(published, ShadowDecided), "its own event type, never a RouteDecided"
    assert published.event_id != decision.event_id
    assert (published.request_id, published.live_event_id) == ("req-1", decision.event_id)
    assert published.config_sha256 == shadow_router.config_sha256 != decision.config_sha256
    assert published.live_config_sha256 == decision.config_sha256
    assert (published.live_route_id, published.route_id) == ("deep", "lite")
    assert (published.live_reason, published.reason) == ("semantic", "low_confidence")
    assert published.differs == ("route_id", "reason", "target_model", "match_source")
    assert registry.get_sample_value("routemesh_gateway_shadow_decisions_total",
                                     {"outcome": "published"}) == 1


async def test_a_full_shadow_queue_drops_and_counts_instead_of_waiting(tmp_path):
    _, _, shadow_router = _routers(tmp_path)
    publisher = CollectingPublisher()
    registry = CollectorRegistry()
    shadow = Shadow(shadow_router, publisher, _counter(registry), queue_size=2)
    for i in range(5):
        request = RouteRequest.from_text(f"tell me a joke {i}")
        shadow.offer(request, shadow_router.decide(request, f"r{i}"))
    assert registry.get_sample_value("routemesh_gateway_shadow_decisions_total",
                                     {"outcome": "dropped"}) == 3
    await shadow.start()
    await shadow.join()
    await shadow.stop()
    assert [e.request_id for e in publisher.events] == ["r0", "r1"]
