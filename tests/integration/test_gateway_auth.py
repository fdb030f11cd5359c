"""Inbound keys through ROUTEMESH_AUTH_KEYS_FILE on a running gateway: a rotation takes
effect without a restart, even one that keeps the file's size and modification time."""

import asyncio
import hashlib
import os
import signal
import time

import httpx
import pytest

from tests.integration.conftest import start_gateway, wait_until_ready
from tests.services.gateway.conftest import Behaviour, Served, fake_upstream

pytestmark = [pytest.mark.broker, pytest.mark.model]
# Two keys of the same length: their hashes make key files of the same size.
OLD, NEW = "client-key-0001", "client-key-0002"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def _status(client: httpx.AsyncClient, key: str) -> int:
    response = await client.post(
        "/v1/route", json={"input": "hello there"}, headers={"authorization": f"Bearer {key}"})
    return response.status_code


async def test_a_same_size_same_timestamp_key_swap_is_seen_without_a_restart(
    settings, tmp_path
):
    keys = tmp_path / "keys"
    keys.write_text(f"{sha(OLD)}\n")
    stamp = keys.stat()
    with Served(fake_upstream(Behaviour())) as upstream:
        gateway, port, metrics, log = start_gateway(
            settings, tmp_path, f"{upstream.url}/v1", ROUTEMESH_AUTH_KEYS_FILE=str(keys))
        try:
            await wait_until_ready(metrics, gateway, log)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                assert await _status(client, OLD) == 200
                assert await _status(client, NEW) == 401
                # The rotation: same size, and the timestamp put back as it was, as a
                # filesystem with coarse timestamps would show a swap within its tick.
                keys.write_text(f"{sha(NEW)}\n")
                os.utime(keys, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
                assert keys.stat().st_size == stamp.st_size
                deadline = time.monotonic() + 20
                while await _status(client, NEW) != 200:
                    assert time.monotonic() < deadline, "the new key never started working"
                    await asyncio.sleep(0.2)
                assert await _status(client, OLD) == 401
        finally:
            gateway.send_signal(signal.SIGTERM)
            assert gateway.wait(30) == 0, log.read_text()[-2000:]
