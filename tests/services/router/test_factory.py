import pytest
from qdrant_client import QdrantClient

from routemesh.services.router import StaleBankError, factory, load_config, load_router
from routemesh.services.router.bank import config_utterances_sha256, route_bank_sha256
from tests.services.router.conftest import CONFIG, HashingEncoder


def test_a_reload_keeps_the_encoder_unless_its_config_changed(config_path, monkeypatch):
    built = []

    def build_encoder(config):
        built.append(config)
        return HashingEncoder()

    monkeypatch.setattr(factory, "build_dense_encoder", build_encoder)
    qdrant = QdrantClient(":memory:")
    first = load_router(config_path, qdrant=qdrant, autobuild=True)

    config_path.write_text(CONFIG.replace("fast: lite,", "fast: lite, speedy: lite,"))
    second = load_router(config_path, qdrant=qdrant, autobuild=True, current=first)
    assert second.config_sha256 != first.config_sha256
    assert second.encoder is first.encoder
    assert len(built) == 1

    config_path.write_text(CONFIG.replace("encoder: {kind: local}",
                                          "encoder: {kind: local, batch_size: 8}"))
    third = load_router(config_path, qdrant=qdrant, autobuild=True, current=second)
    assert third.encoder is not second.encoder
    assert len(built) == 2


def test_a_missing_or_stale_bank_is_refused_unless_autobuild(config_path):
    qdrant, encoder = QdrantClient(":memory:"), HashingEncoder()
    with pytest.raises(LookupError, match="bank build"):
        load_router(config_path, qdrant=qdrant, encoder=encoder)
    built = load_router(config_path, qdrant=qdrant, encoder=encoder, autobuild=True)
    assert built.matcher.utterances_sha256 == config_utterances_sha256(load_config(config_path),
                                                                 encoder.name)
    assert built.route_bank_sha256 == route_bank_sha256(built.matcher.utterances_sha256,
                                                  built.matcher.model)
    (config_path.parent / "deep.txt").write_text("one new utterance\n")
    stale = load_config(config_path)
    with pytest.raises(StaleBankError, match=r"does not match routes\.yaml"):
        load_router(stale, qdrant=qdrant, encoder=encoder)


def test_a_route_model_fitted_for_other_scoring_is_refused_like_a_stale_bank(config_path):
    qdrant, encoder = QdrantClient(":memory:"), HashingEncoder()
    load_router(config_path, qdrant=qdrant, encoder=encoder, autobuild=True)
    config_path.write_text(CONFIG.replace("head: none, aggregation: max",
                                          "head: none, aggregation: topk_mean"))
    with pytest.raises(StaleBankError, match=r"route model .* other scoring settings"):
        load_router(config_path, qdrant=qdrant, encoder=encoder)
    rebuilt = load_router(config_path, qdrant=qdrant, encoder=encoder, autobuild=True)
    assert rebuilt.matcher.model.scoring == "topk_mean"
