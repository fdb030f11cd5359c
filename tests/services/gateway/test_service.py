from routemesh.services.gateway.settings import GatewaySettings
from routemesh.services.runtime.kafka import _delivery
from routemesh.services.runtime.settings import ServiceSettings


def test_the_gateway_batches_its_events_longer_than_other_producers(monkeypatch):
    assert _delivery(GatewaySettings())["linger_ms"] == 50
    assert _delivery(ServiceSettings())["linger_ms"] == 5
    monkeypatch.setenv("ROUTEMESH_KAFKA_LINGER_MS", "0")
    assert _delivery(GatewaySettings())["linger_ms"] == 0
