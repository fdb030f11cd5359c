"""The image, built the way `make image` builds it and run as a user runs it: read-only
root, uid 10001, on the host's network against the embedded broker (the image's broker
target) and a fake upstream. The bank is built into a volume, the gateway answers a chat
and publishes the decision, every consumer service consumes it (the audit writer's file
appears in its volume), the HEALTHCHECK reaches healthy, and the int8 encoder runs under
the read-only root. Skipped only where no Docker daemon can run; required in CI."""

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition

from routemesh.contracts import RouteDecided, decode_event
from routemesh.services.runtime.embedded_broker import free_port
from tests.services.gateway.conftest import Behaviour, Served, fake_upstream

from .conftest import tool

ROOT = Path(__file__).resolve().parents[2]
VERSION = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
               if line.startswith("version = "))
IMAGE, BROKER = f"routemesh:{VERSION}", f"routemesh-broker:{VERSION}"
CONSUMERS = ("audit-writer", "drift-detector", "scorer", "replay-worker")

pytestmark = pytest.mark.slow


def docker(*args: str, check: bool = True, timeout: float = 600) -> str:
    return subprocess.run([tool("docker"), *args], capture_output=True, text=True,
                          check=check, timeout=timeout).stdout.strip()


@pytest.fixture(scope="module")
def image() -> str:
    if subprocess.run([tool("docker"), "info"], capture_output=True).returncode != 0:
        if os.environ.get("CI_REQUIRE_DEPLOY_TOOLS"):
            pytest.fail("a Docker daemon is required here (CI_REQUIRE_DEPLOY_TOOLS)")
        pytest.skip("no Docker daemon")
    tool("debootstrap")
    subprocess.run([str(ROOT / "deploy" / "build" / "image.sh")], check=True, cwd=ROOT,
                   capture_output=True, timeout=3600)
    return IMAGE


class Containers:
    """Containers of one test, removed at its end."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.volumes: list[str] = []
        self.prefix = f"rm-test-{uuid.uuid4().hex[:8]}"

    def volume(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        docker("volume", "create", full)
        self.volumes.append(full)
        return full

    def run(self, name: str, *args: str) -> str:
        full = f"{self.prefix}-{name}"
        docker("run", "-d", "--name", full, *args)
        self.names.append(full)
        return full

    def remove(self) -> None:
        for name in self.names:
            docker("rm", "-f", name, check=False)
        for volume in self.volumes:
            docker("volume", "rm", "-f", volume, check=False)


@pytest.fixture
def containers():
    made = Containers()
    yield made
    made.remove()


def until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = condition()
        except (OSError, httpx.HTTPError, subprocess.CalledProcessError):
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(1)


def served(port: int, path: str) -> bool:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200


async def decisions(bootstrap: str, prefix: str) -> list[RouteDecided]:
    topic = f"{prefix}route.decisions.v1"
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        found = []
        for records in (await consumer.getmany(timeout_ms=3000)).values():
            found += [decode_event(r.value) for r in records]
        return found
    finally:
        await consumer.stop()


def test_the_image_serves_without_torch_read_only_as_its_user(image, containers, tmp_path):
    kafka = free_port()
    bootstrap = f"127.0.0.1:{kafka}"
    listener = f"tcp://{bootstrap}"
    containers.run("broker", "--network", "host", BROKER, "--listener-url", listener,
                   "--advertised-listener-url", listener)
    hardened = ["--read-only", "--tmpfs", "/tmp", "--user", "10001", "--network", "host"]
    common = ["-e", f"ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS={bootstrap}"]
    until(lambda: "created" in docker("run", "--rm", *hardened, *common,
                                      "--entrypoint", "routemesh", image, "topics", "create",
                                      "--replication-factor", "1"), 60, "topics created")
    assert docker("run", "--rm", "--entrypoint", "python", image, "-c",
                  "import importlib.util as u; print([m for m in ('torch', "
                  "'sentence_transformers', 'transformers') if u.find_spec(m)])") == "[]"

    # The bank, into the gateway's volume, where the gateway looks by default.
    gateway_data = containers.volume("gateway")
    built = docker("run", "--rm", *hardened, "-v", f"{gateway_data}:/var/lib/routemesh",
                   "--entrypoint", "routemesh", image, "bank", "build", "--config",
                   "/etc/routemesh/lite-deep.yaml")
    assert "route_bank_sha256" in built

    with Served(fake_upstream(Behaviour())) as upstream:
        http, metrics = free_port(), free_port()
        started = time.monotonic()
        gateway = containers.run(
            "gateway", *hardened, *common, "-v", f"{gateway_data}:/var/lib/routemesh",
            "-e", f"ROUTEMESH_UPSTREAM_BASE_URL={upstream.url}/v1",
            "-e", "ROUTEMESH_AUTH_ENABLED=false", "-e", f"ROUTEMESH_HTTP_PORT={http}",
            "-e", "ROUTEMESH_HTTP_HOST=127.0.0.1", "-e", f"ROUTEMESH_METRICS_PORT={metrics}",
            image, "gateway")
        until(lambda: served(metrics, "/readyz"), 180, "the gateway ready")
        cold_start_s = time.monotonic() - started
        consumer_metrics = {}
        for name in CONSUMERS:
            consumer_metrics[name] = free_port()
            data = containers.volume(name)
            containers.run(name, *hardened, *common, "-v", f"{data}:/var/lib/routemesh",
                           "-e", f"ROUTEMESH_METRICS_PORT={consumer_metrics[name]}", image,
                           name)
        for name, port in consumer_metrics.items():
            until(lambda port=port: served(port, "/readyz"), 180, f"{name} ready")

        answer = httpx.post(f"http://127.0.0.1:{http}/v1/chat/completions", timeout=30,
                            json={"model": "auto",
                                  "messages": [{"role": "user", "content": "hello there"}]})
        assert answer.status_code == 200, answer.text
        request_id = answer.headers["x-routemesh-request-id"]
        found = until(lambda: [d for d in asyncio.run(decisions(bootstrap, "routemesh."))
                               if d.request_id == request_id], 60, "the decision on Kafka")
        assert found[0].route_id == answer.headers["x-routemesh-route"]

        # Each consumer consumed it; the audit record is in the writer's volume.
        audit = f"{containers.prefix}-audit-writer"

        def audited() -> bool:
            listing = docker("run", "--rm", "-v", f"{audit}:/audit", "--entrypoint", "sh",
                             image, "-c", "cat /audit/audit/*.jsonl 2>/dev/null || true")
            return any(json.loads(line)["request_id"] == request_id
                       for line in listing.splitlines() if line.strip())

        until(audited, 120, "the audit record in the audit writer's volume")
        for name in ("audit-writer", "drift-detector", "scorer"):

            def consumed(port: int = consumer_metrics[name]) -> bool:
                page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                return any(line.startswith("routemesh_consumer_events_total{")
                           and 'topic="routemesh.route.decisions.v1"' in line
                           for line in page.splitlines())

            until(consumed, 60, f"{name} consuming the decision")

        until(lambda: docker("inspect", "--format", "{{.State.Health.Status}}",
                             gateway) == "healthy", 120, "the HEALTHCHECK healthy")
        inspected = json.loads(docker("inspect", gateway))[0]
        assert inspected["Config"]["User"] == "10001"
        assert inspected["HostConfig"]["ReadonlyRootfs"] is True
        rss = docker("stats", "--no-stream", "--format", "{{.MemUsage}}", gateway)

    # The int8 encoder under the read-only root: its model was exported at build time.
    config = tmp_path / "config"
    shutil.copytree(ROOT / "deploy" / "examples", config)
    lite_deep = config / "lite-deep.yaml"
    lite_deep.write_text(lite_deep.read_text().replace(
        "encoder:\n", "encoder:\n  backend: onnx-int8\n", 1)
        if "encoder:\n" in lite_deep.read_text() else
        lite_deep.read_text() + "encoder:\n  backend: onnx-int8\n")
    decided = json.loads(docker("run", "--rm", *hardened, "-v", f"{config}:/config:ro",
                                "--entrypoint", "routemesh", image, "route", "--config",
                                "/config/lite-deep.yaml", "prove that there are infinitely "
                                "many primes"))
    assert decided["reason"] in ("semantic", "low_confidence", "rule")
    size_mb = int(docker("image", "inspect", "--format", "{{.Size}}", image)) / 1e6
    print(f"image {size_mb:.0f} MB; gateway cold start to ready {cold_start_s:.1f} s; "
          f"gateway memory {rss}")
    assert size_mb <= 700


def test_compose_runs_the_mesh_with_what_this_machine_has(image, tmp_path):
    """compose.yaml with deploy/compose/local.yaml (and the try override's fake upstream):
    the embedded broker's image for Kafka, local-mode Qdrant, the host's Prometheus. A chat
    through the gateway lands as one audit record in the audit writer's volume, and a
    Prometheus on the host, from the shipped deploy/compose/prometheus.yaml, scrapes
    every service."""
    project = f"rm-test-{uuid.uuid4().hex[:8]}"
    gateway = free_port()
    compose = [tool("docker-compose"), "-p", project, "-f", "compose.yaml", "-f",
               "deploy/compose/local.yaml", "-f", "deploy/compose/try.yaml", "--profile", "mesh"]
    env = {**os.environ, "GATEWAY_PORT": str(gateway)}

    def run(*args: str) -> str:
        return subprocess.run([*compose, *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, check=True, timeout=600).stdout

    shipped = yaml.safe_load((ROOT / "deploy" / "compose" / "prometheus.yaml").read_text())
    shipped["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s",
                          "scrape_timeout": "900ms"}
    shipped["rule_files"] = [str(ROOT / "deploy" / "prometheus" / "rules.yaml")]
    config = tmp_path / "prometheus.yaml"
    config.write_text(yaml.safe_dump(shipped))
    metrics = next(int(group["targets"][0].rsplit(":", 1)[1])
                   for group in shipped["scrape_configs"][0]["static_configs"]
                   if group["labels"]["service"] == "gateway")
    api = f"http://127.0.0.1:{free_port()}/api/v1"
    try:
        run("up", "-d", "--no-build")
        prometheus = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={api.split('/')[2]}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            until(lambda: served(metrics, "/readyz") and httpx.post(
                f"http://127.0.0.1:{gateway}/v1/chat/completions", timeout=30,
                json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
            ).status_code == 200, 240, "the gateway answering")
            answer = httpx.post(f"http://127.0.0.1:{gateway}/v1/chat/completions", timeout=30,
                                json={"model": "auto", "messages": [
                                    {"role": "user", "content": "hello from compose"}]})
            request_id = answer.headers["x-routemesh-request-id"]

            def audited() -> list[dict]:
                lines = run("exec", "-T", "audit-writer", "sh", "-c",
                            "cat /var/lib/routemesh/audit/*.jsonl 2>/dev/null || true")
                return [r for r in map(json.loads, filter(str.strip, lines.splitlines()))
                        if r["request_id"] == request_id]

            records = until(audited, 120, "the audit record in the audit writer's volume")
            assert len(records) == 1
            assert records[0]["decision"]["route_id"] == answer.headers["x-routemesh-route"]

            def scraped() -> set[str]:
                found = httpx.get(f"{api}/query", params={"query": 'up{job="routemesh"} == 1'},
                                  timeout=5).json()["data"]["result"]
                return {r["metric"]["service"] for r in found} == {
                    "gateway", *CONSUMERS}

            until(scraped, 120, "the host's Prometheus scraping every service")
        finally:
            prometheus.terminate()
            prometheus.wait(30)
    finally:
        subprocess.run([*compose, "down", "-v", "--remove-orphans"], cwd=ROOT, env=env,
                       capture_output=True, timeout=300)
