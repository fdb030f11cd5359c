"""An event published with the broker factory is read back unchanged by `routemesh tail`
and by the third-party example consumer, which knows only the JSON Schema."""

import json
import subprocess
import sys

import pytest

from routemesh.contracts import FormatSignals, LayerAttempt, RouteDecided, decode_event
from routemesh.contracts.topics import ROUTE_DECISIONS
from routemesh.services.runtime.kafka import create_broker
from tests.integration.conftest import CLI, EXAMPLES, cli_env
from tests.services.runtime.helpers import broker_publish

pytestmark = pytest.mark.broker


@pytest.fixture
async def published(settings) -> RouteDecided:
    event = RouteDecided(
        request_id="req-tail-1",
        route_id="deep",
        target_model="large-model",
        reason="semantic",
        layer="semantic",
        score=0.8,
        attempts=(LayerAttempt(layer="semantic", selected_route="deep", decided=True),),
        prompt_sha256="f" * 64,
        format=FormatSignals(message_count=2, input_chars=40),
    )
    broker = create_broker(settings, service="tail-test")
    async with broker:
        await broker.start()
        await broker_publish(broker, settings)(event)
    return event


def test_routemesh_tail_prints_the_event_unchanged(settings, published):
    result = subprocess.run(
        [*CLI, "tail", "route.decisions.v1", "--from-beginning", "--max", "1", "--timeout", "30"],
        env=cli_env(settings),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1
    assert decode_event(lines[0].encode()) == published


def test_the_example_downstream_consumer_reads_it_with_only_the_schema(settings, published):
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "downstream_consumer.py"),
            "--bootstrap", settings.kafka_bootstrap_servers,
            "--topic", settings.topic(ROUTE_DECISIONS),
            "--group", "example-test",
            "--from-beginning",
            "--max", "1",
        ],
        capture_output=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr.decode()
    (line,) = result.stdout.decode().splitlines()
    assert decode_event(json.dumps(json.loads(line)).encode()) == published


def test_the_example_imports_nothing_from_routemesh():
    source = (EXAMPLES / "downstream_consumer.py").read_text()
    assert "routemesh." not in source.replace("routemesh.route.decisions", "")
    assert "import routemesh" not in source
