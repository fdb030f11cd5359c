import asyncio
import json
import logging
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
from qdrant_client import QdrantClient

from routemesh.contracts import RouteBankPublished
from routemesh.services.gateway.reload import CLOCK_SKEW_S, Reloader
from routemesh.services.router.bank import build_bank, load_snapshot
from routemesh.services.router.cascade import Router
from routemesh.services.router.config import load_config
from tests.services.gateway.conftest import Behaviour, Served, fake_upstream
from tests.services.router.conftest import CONFIG, DEEP, HashingEncoder


def builder(path):
    def build() -> Router:
        loaded = load_config(path)
        encoder = HashingEncoder()
        client = QdrantClient(":memory:")
        build_bank(loaded, encoder, client, "bank")
        return Router(loaded, load_snapshot(client, "bank", loaded.config.semantic), encoder)
    return build


async def refused(reloader, gateway, good, caplog) -> str:
    """Check that a changed file is refused, once, with the last good router kept; the
    refusal's error."""
    caplog.set_level(logging.ERROR)
    assert await reloader.check_file() is False
    assert gateway.state.router is good
    (refusal,) = [r for r in caplog.records if r.getMessage().startswith("reload refused")]
    assert gateway.state.registry.get_sample_value(
        "routemesh_gateway_config_reloads_total",
        {"trigger": "config_file", "result": "refused"}) == 1
    return refusal.error


async def test_a_changed_config_is_swapped_in_and_a_broken_one_refused(gateway, tmp_path, caplog):
    config = tmp_path / "routes.yaml"
    reloader = Reloader(gateway.state, builder(config), gateway.state.registry)
    first = gateway.state.router
    assert await reloader.check_file() is None, "unchanged file, nothing to do"

    config.write_text(CONFIG.replace("fast: lite,", "fast: lite, speedy: lite,"))
    assert await reloader.check_file() is True
    assert gateway.state.router is not first
    assert gateway.state.router.loaded.sha256 != first.loaded.sha256
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        response = await client.post("/v1/chat/completions", json={
            "model": "speedy", "messages": [{"role": "user", "content": "hi"}]})
    assert response.headers["x-routemesh-reason"] == "override"

    good = gateway.state.router
    config.write_text(CONFIG.replace("threshold: 0.45", "threshold: lots"))
    error = await refused(reloader, gateway, good, caplog)
    assert "routes.yaml:" in error
    assert "routes[1].threshold" in error
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        still = await client.post("/v1/chat/completions", json={
            "model": "speedy", "messages": [{"role": "user", "content": "hi"}]})
    assert still.status_code == 200
    assert still.headers["x-routemesh-reason"] == "override", "the good config still decides"


async def test_editing_an_utterances_file_reloads_without_touching_the_config(gateway, tmp_path):
    config = tmp_path / "routes.yaml"
    reloader = Reloader(gateway.state, builder(config), gateway.state.registry)
    first = gateway.state.router
    assert tmp_path / "deep.txt" in first.loaded.files
    assert await reloader.check_file() is None
    with (tmp_path / "deep.txt").open("a") as utterances:
        utterances.write("plan a database migration with zero downtime\n")
    assert await reloader.check_file() is True
    assert gateway.state.router is not first
    assert len(gateway.state.router.loaded.utterances) == len(first.loaded.utterances) + 1



async def test_a_broken_utterances_file_is_refused_with_its_line_and_the_router_kept(
        gateway, tmp_path, caplog):
    """A malformed line is never skipped: dropping one utterance silently would change
    routing without a word. The whole file is refused and the last good router serves."""
    config = tmp_path / "routes.yaml"
    reloader = Reloader(gateway.state, builder(config), gateway.state.registry)
    lines = [json.dumps({"text": t}) for t in DEEP.splitlines() if t.strip()]
    (tmp_path / "deep.jsonl").write_text("\n".join(lines) + "\n")
    config.write_text(CONFIG.replace("utterances_file: deep.txt", "utterances_file: deep.jsonl"))
    assert await reloader.check_file() is True
    good = gateway.state.router
    assert len(good.loaded.utterances) == len(lines) + 3

    broken = [lines[0], "plan a database migration with zero downtime", *lines[1:]]
    (tmp_path / "deep.jsonl").write_text("\n".join(broken) + "\n")
    error = await refused(reloader, gateway, good, caplog)
    assert "utterances_file: deep.jsonl:2: needs a JSON object with text" in error
    async with httpx.AsyncClient(base_url=gateway.url) as client:
        still = await client.post("/v1/route", json={
            "messages": [{"role": "user", "content": "hi"}]})
    assert still.status_code == 200

def announced(sha256: str, ago_s: float = 0.0) -> RouteBankPublished:
    return RouteBankPublished(
        collection="bank", route_bank_sha256=sha256, encoder="hashing", utterances=4,
        routes=("lite", "deep"), occurred_at=datetime.now(UTC) - timedelta(seconds=ago_s),
    )


async def test_a_published_bank_reloads_only_when_it_differs(gateway, tmp_path):
    config = tmp_path / "routes.yaml"
    reloader = Reloader(gateway.state, builder(config), gateway.state.registry)
    current = gateway.state.router
    await reloader.on_bank_published(announced(current.matcher.sha256))
    assert gateway.state.router is current
    await reloader.on_bank_published(announced("f" * 64))
    assert gateway.state.router is not current


async def test_a_bank_announced_before_the_router_loaded_is_history(gateway, tmp_path):
    """The topic is read from its start at every start: old announcements must not make
    the gateway load its bank again once for each."""
    config = tmp_path / "routes.yaml"
    reloader = Reloader(gateway.state, builder(config), gateway.state.registry,
                        built_at=time.time())
    current = gateway.state.router
    await reloader.on_bank_published(announced("e" * 64, ago_s=CLOCK_SKEW_S + 3600))
    assert gateway.state.router is current
    # Within the clock-skew allowance it may be newer than what was loaded: reload.
    await reloader.on_bank_published(announced("e" * 64, ago_s=CLOCK_SKEW_S / 2))
    assert gateway.state.router is not current
    assert reloader.built_at > time.time() - 60


class BlockingEncoder(HashingEncoder):
    """Holds every encode until released, so a request can be caught mid-decision."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def encode(self, texts):
        self.entered.set()
        assert self.release.wait(30), "never released"
        return super().encode(texts)


def _router(config_path, encoder) -> Router:
    loaded = load_config(config_path)
    client = QdrantClient(":memory:")
    build_bank(loaded, HashingEncoder(), client, "bank")
    return Router(loaded, load_snapshot(client, "bank", loaded.config.semantic), encoder)


async def test_a_request_in_flight_keeps_the_config_it_started_with(gateway, tmp_path):
    """A reload while a request waits for the encoder must not give that request the new
    config's upstream or fallback route."""
    with Served(fake_upstream(Behaviour(content="from the new upstream"))) as new_upstream:
        old = CONFIG.replace("    threshold: 0.40\n", "    threshold: 0.40\n"
                             "    fallback_route: deep\n", 1)
        new = CONFIG.replace("    threshold: 0.40\n", "    threshold: 0.40\n"
                             f"    upstream_base_url: {new_upstream.url}/v1\n", 1)
        (tmp_path / "old.yaml").write_text(old)
        (tmp_path / "new.yaml").write_text(new)
        encoder = BlockingEncoder()
        gateway.state.router = _router(tmp_path / "old.yaml", encoder)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            pending = asyncio.ensure_future(client.post("/v1/chat/completions", json={
                "model": "auto",
                "messages": [{"role": "user", "content": "what is the capital of france"}]}))
            assert await asyncio.to_thread(encoder.entered.wait, 30)
            gateway.state.router = _router(tmp_path / "new.yaml", HashingEncoder())
            encoder.release.set()
            response = await pending
    assert response.headers["x-routemesh-route"] == "lite"
    assert response.json()["choices"][0]["message"]["content"] != "from the new upstream"
    assert gateway.state.router.route("lite").upstream_base_url is not None
