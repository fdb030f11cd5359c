from routemesh.services.gateway import service
from routemesh.services.gateway.settings import GatewaySettings
from routemesh.services.runtime.kafka import _delivery
from routemesh.services.runtime.settings import ServiceSettings
from tests.services.router.conftest import CONFIG, DEEP, HashingEncoder


def test_a_reload_keeps_the_encoder_unless_its_config_changed(tmp_path, monkeypatch):
    built = []

    def build_encoder(config):
        built.append(config)
        return HashingEncoder()

    monkeypatch.setattr(service, "build_dense_encoder", build_encoder)
    config = tmp_path / "routes.yaml"
    config.write_text(CONFIG)
    (tmp_path / "deep.txt").write_text(DEEP)
    settings = GatewaySettings(router_config=config, qdrant_path=None, qdrant_url=None,
                               bank_autobuild=True)
    first = service.build_router(settings, "g")

    config.write_text(CONFIG.replace("fast: lite,", "fast: lite, speedy: lite,"))
    second = service.build_router(settings, "g", first)
    assert second.loaded.sha256 != first.loaded.sha256
    assert second.encoder is first.encoder
    assert len(built) == 1

    config.write_text(CONFIG.replace("encoder: {kind: local}",
                                     "encoder: {kind: local, batch_size: 8}"))
    third = service.build_router(settings, "g", second)
    assert third.encoder is not second.encoder
    assert len(built) == 2


def test_the_gateway_batches_its_events_longer_than_other_producers(monkeypatch):
    assert _delivery(GatewaySettings())["linger_ms"] == 50
    assert _delivery(ServiceSettings())["linger_ms"] == 5
    monkeypatch.setenv("ROUTEMESH_KAFKA_LINGER_MS", "0")
    assert _delivery(GatewaySettings())["linger_ms"] == 0
