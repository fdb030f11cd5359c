"""A real Prometheus (the Debian package) scrapes every service of `routemesh dev`: all
targets up, and a routemesh metric read back through Prometheus' HTTP API after a few
gateway requests."""

import json
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from routemesh.services.runtime.embedded_broker import free_port
from routemesh.services.runtime.service import discover_services
from tests.deploy.conftest import tool
from tests.integration.conftest import CLI

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.model]


def _json(url: str, body: bytes | None = None) -> dict:
    request = urllib.request.Request(url, data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = condition()
        except OSError:
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.5)


def test_prometheus_scrapes_every_service_and_reads_a_metric(tmp_path):
    prometheus_binary = tool("prometheus")
    ports = {(name, p.name): free_port()
             for name, spec in discover_services().items() for p in spec.ports}
    moves = [arg for (name, kind), number in ports.items()
             for arg in ("--port", f"{name}.{kind}={number}")]
    targets = {name: f"127.0.0.1:{number}" for (name, kind), number in ports.items()
               if kind == "metrics"}
    config = tmp_path / "prometheus.yaml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "routemesh", "static_configs": [
            {"targets": [target], "labels": {"service": name}}
            for name, target in targets.items()]}],
    }))
    web = free_port()
    mesh = subprocess.Popen(
        [*CLI, "dev", "--data-dir", str(tmp_path / "data"), "--kafka-port", str(free_port()),
         *moves], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    prometheus = subprocess.Popen(
        [prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))
    api = f"http://127.0.0.1:{web}/api/v1"
    try:
        def all_up():
            active = _json(f"{api}/targets")["data"]["activeTargets"]
            return len(active) == len(targets) and all(t["health"] == "up" for t in active)

        _until(all_up, 240, "every target up")
        # Metrics answer before the gateway has loaded its encoder: wait until it routes.
        gateway = f"http://127.0.0.1:{ports[('gateway', 'http')]}"
        for text in ("what is 2 + 2", "prove that the square root of 2 is irrational"):
            _until(lambda text=text: _json(f"{gateway}/v1/route",
                                           json.dumps({"input": text}).encode()),
                   240, "a routed request")

        def counted(metric: str):
            query = urllib.parse.quote(f"sum({metric})")
            result = _json(f"{api}/query?query={query}")["data"]["result"]
            return result and float(result[0]["value"][1]) >= 2

        _until(lambda: counted("routemesh_gateway_requests_total"), 60,
               "the requests counted in Prometheus")
        # The gateway's encoder is the caching one by default: two texts, two misses.
        _until(lambda: counted("routemesh_gateway_embedding_cache_misses_total"), 60,
               "the embedding cache's misses counted")
        query = urllib.parse.quote('up{job="routemesh"}')
        services = {r["metric"]["service"] for r in _json(f"{api}/query?query={query}")[
            "data"]["result"] if r["value"][1] == "1"}
        assert services == set(targets)
    finally:
        prometheus.terminate()
        mesh.send_signal(signal.SIGINT)
        prometheus.wait(30)
        mesh.wait(60)
