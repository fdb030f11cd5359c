"""`routemesh dev` on free ports: prints where each component listens, serves every
registered topic, and stops on Ctrl-C within 10 s with no traceback."""

import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from routemesh.contracts import TOPICS
from routemesh.services.cli.dev import STOP_TIMEOUT_S
from routemesh.services.runtime.embedded_broker import free_port
from routemesh.services.runtime.service import discover_services
from tests.integration.conftest import CLI
from tests.integration.test_embedded_broker import asyncio_run_list_topics
from tests.readme import documented_metrics, served_metrics

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.model]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def _post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _page(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _assert_metrics_as_documented(pages: dict[str, str]) -> None:
    """Each service serves exactly the README's rows for it, with the documented type and
    labels: a metric added, renamed or relabelled on either side alone fails here."""
    documented = documented_metrics()
    for service, page in pages.items():
        served = served_metrics(page)
        consumer = any(name.startswith("routemesh_consumer_") for name in served)
        expected = {m.name for m in documented.values()
                    if m.services in (service, "every") or (m.services == "consumers"
                                                             and consumer)}
        assert set(served) == expected, service
        for name, (kind, label_sets) in served.items():
            assert kind == documented[name].type, name
            for labels in label_sets:
                assert labels == documented[name].labels, (name, labels)
    samples = {name: labels for page in pages.values()
               for name, (_, labels) in served_metrics(page).items() if labels}
    assert "routemesh_gateway_requests_total" in samples, "the traffic left its samples"


def test_dev_starts_the_mesh_and_stops_cleanly_on_ctrl_c(tmp_path):
    port = free_port()
    # Every port every registered service declares, moved to a free one.
    ports = {(name, p.name): free_port()
             for name, spec in discover_services().items() for p in spec.ports}
    audit_metrics = ports[("audit-writer", "metrics")]
    gateway, gateway_metrics = ports[("gateway", "http")], ports[("gateway", "metrics")]
    moves = [arg for (name, kind), number in ports.items()
             for arg in ("--port", f"{name}.{kind}={number}")]
    process = subprocess.Popen(
        [*CLI, "dev", "--data-dir", str(tmp_path / "data"), "--kafka-port", str(port), *moves],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not any("running" in line for line in lines):
            assert time.monotonic() < deadline, lines
            line = process.stdout.readline()
            assert line or process.poll() is None, lines
            lines.append(line.rstrip("\n"))
        components = dict(line.rsplit("  ", 1) for line in lines if "  " in line)
        assert components["kafka"] == f"127.0.0.1:{port}"
        assert components["qdrant"].startswith(str(tmp_path / "data" / "qdrant"))
        assert (tmp_path / "data" / "qdrant").is_dir()

        metrics_url = f"http://127.0.0.1:{audit_metrics}/metrics"
        assert components["audit-writer metrics"] == metrics_url
        deadline = time.monotonic() + 60
        while _get(f"http://127.0.0.1:{audit_metrics}/readyz") != 200:
            assert time.monotonic() < deadline, "the audit writer never became ready"
            time.sleep(0.5)
        assert _get(metrics_url) == 200
        assert components["gateway"] == f"http://127.0.0.1:{gateway}"
        deadline = time.monotonic() + 180
        while _get(f"http://127.0.0.1:{gateway_metrics}/readyz") != 200:
            assert time.monotonic() < deadline, "the gateway never became ready"
            time.sleep(0.5)
        assert _get(f"http://127.0.0.1:{gateway}/v1/models") == 200
        # Traffic, so that labelled series have samples; then every service's metrics
        # page against the README's table.
        _post(f"http://127.0.0.1:{gateway}/v1/route", b'{"input": "what is 2 + 2"}')
        _post(f"http://127.0.0.1:{gateway}/v1/chat/completions",
              b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}]}')
        pages = {name: _page(f"http://127.0.0.1:{number}/metrics")
                 for (name, kind), number in ports.items() if kind == "metrics"}

        listed = set(asyncio_run_list_topics(f"127.0.0.1:{port}"))
        assert {t.name() for t in TOPICS} <= listed

        stopped_at = time.monotonic()
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=15)
        elapsed = time.monotonic() - stopped_at
    finally:
        if process.poll() is None:
            process.kill()
    rest = process.stdout.read()
    assert code == 0, rest
    _assert_metrics_as_documented(pages)
    # Services get STOP_TIMEOUT_S together, then the broker its second.
    assert elapsed < STOP_TIMEOUT_S + 2
    assert "Traceback" not in "\n".join(lines) + rest


def test_dev_refuses_a_taken_kafka_port_with_a_clear_error(kafka, tmp_path):
    result = subprocess.run(
        [*CLI, "dev", "--data-dir", str(tmp_path), "--kafka-port", str(kafka.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"port {kafka.port}" in result.stderr
    assert "Traceback" not in result.stderr
