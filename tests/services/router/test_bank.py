import pytest
from qdrant_client import QdrantClient

from routemesh.services.router import Router, RouteRequest
from routemesh.services.router.bank import QdrantMatcher, build_bank, load_snapshot
from routemesh.services.router.config import load_config
from routemesh.services.router.factory import StaleBankError, load_router
from tests.services.router.conftest import HashingEncoder


def test_rebuilding_an_unchanged_bank_embeds_nothing(loaded, encoder):
    client = QdrantClient(":memory:")
    first = build_bank(loaded, encoder, client, "bank")
    assert (first.embedded, first.kept, first.removed) == (6, 0, 0)
    encoder.calls.clear()
    again = build_bank(loaded, encoder, client, "bank")
    assert (again.embedded, again.kept, again.removed) == (0, 6, 0)
    assert encoder.calls == []
    assert again.sha256 == first.sha256


def test_a_changed_utterance_is_the_only_one_embedded(config_path, encoder):
    client = QdrantClient(":memory:")
    first = build_bank(load_config(config_path), encoder, client, "bank")
    deep = config_path.parent / "deep.txt"
    deep.write_text(deep.read_text().replace("merge sorted lists", "merge k sorted lists"))
    encoder.calls.clear()
    second = build_bank(load_config(config_path), encoder, client, "bank")
    assert (second.embedded, second.removed, second.kept) == (1, 1, 5)
    assert sum(encoder.calls) == 1
    assert second.sha256 != first.sha256


def test_the_snapshot_and_the_qdrant_backend_agree(loaded, encoder):
    client = QdrantClient(":memory:")
    build_bank(loaded, encoder, client, "bank")
    snapshot = load_snapshot(client, "bank", loaded.config.semantic)
    direct = QdrantMatcher(client, "bank", loaded.config.semantic)
    assert snapshot.sha256 == direct.sha256
    assert len(snapshot) == 6
    memory_router = Router(loaded, snapshot, encoder)
    qdrant_router = Router(loaded, direct, encoder)
    for text in ["capital of france", "design a rate limiter", "merge sorted lists in python",
                 "joke about cats", "translate hello"]:
        a = memory_router.decide(RouteRequest.from_text(text), "r")
        b = qdrant_router.decide(RouteRequest.from_text(text), "r")
        assert (a.route_id, a.reason) == (b.route_id, b.reason)
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert a.match_text_sha256 == b.match_text_sha256


def test_a_bank_built_on_disk_is_reloaded_by_a_new_client(loaded, encoder, tmp_path):
    client = QdrantClient(path=str(tmp_path / "q"))
    build_bank(loaded, encoder, client, "routemesh-routes")
    client.close()
    router = load_router(loaded, qdrant=QdrantClient(path=str(tmp_path / "q")), encoder=encoder)
    assert router.decide(RouteRequest.from_text("capital of france"), "r").route_id == "lite"


def test_a_stale_bank_is_refused(config_path, encoder):
    client = QdrantClient(":memory:")
    build_bank(load_config(config_path), encoder, client, "routemesh-routes")
    deep = config_path.parent / "deep.txt"
    deep.write_text(deep.read_text() + "a brand new utterance\n")
    with pytest.raises(StaleBankError, match="routemesh bank build"):
        load_router(config_path, qdrant=client, encoder=encoder)


def test_a_missing_collection_says_how_to_build_it(loaded):
    with pytest.raises(LookupError, match="routemesh bank build"):
        load_router(loaded, qdrant=QdrantClient(":memory:"), encoder=HashingEncoder())


def test_a_bank_of_another_encoder_is_stale(loaded, encoder):
    client = QdrantClient(":memory:")
    build_bank(loaded, encoder, client, "routemesh-routes")
    other = HashingEncoder()
    other.name = "test:other"
    with pytest.raises(StaleBankError):
        load_router(loaded, qdrant=client, encoder=other)
