"""The shipped alert rules on real failures: a real Prometheus (the Debian package)
scrapes `routemesh dev` with deploy/prometheus/rules.yaml, and each paging alert fires
when its failure is caused for real and not while the mesh is healthy. The rules are a
test copy with `for:` and the rate windows shortened (the expressions are the shipped
ones); alert states are read through Prometheus' HTTP API."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import pytest
import yaml

from routemesh.services.runtime.embedded_broker import free_port
from routemesh.services.runtime.service import discover_services
from tests.deploy.conftest import tool
from tests.integration.conftest import CLI
from tests.services.gateway.conftest import Behaviour, Served, fake_upstream

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.model]
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules.yaml"
# A test copy of the rules: the same expressions over 20 s windows, pending for 5 s.
WINDOW, PENDING = "20s", "5s"


def shortened_rules(target: Path) -> None:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["expr"] = re.sub(r"\[\d+m\]", f"[{WINDOW}]", rule["expr"])
            if "for" in rule:
                rule["for"] = PENDING
    target.write_text(yaml.safe_dump(rules, sort_keys=False))


class Prometheus:
    def __init__(self, binary: str, tmp_path: Path, targets: dict[str, int]) -> None:
        rules = tmp_path / "rules.yaml"
        shortened_rules(rules)
        config = tmp_path / "prometheus.yaml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "900ms"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "routemesh", "static_configs": [
                {"targets": [f"127.0.0.1:{port}"], "labels": {"service": name}}
                for name, port in targets.items()]}],
        }))
        self.api = f"http://127.0.0.1:{free_port()}/api/v1"
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={urllib.parse.urlsplit(self.api).netloc}"],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.api}/{path}", timeout=10) as response:
            return json.loads(response.read())

    def firing(self) -> list[dict]:
        return [a for a in self.get("alerts")["data"]["alerts"] if a["state"] == "firing"]

    def until_firing(self, alert: str, timeout_s: float = 120, **labels: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                for found in self.firing():
                    if found["labels"]["alertname"] == alert and all(
                            found["labels"].get(k) == v for k, v in labels.items()):
                        return found
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{alert} {labels} never fired"
            time.sleep(1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except (OSError, httpx.HTTPError):
            pass
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.5)


def ready(port: int) -> bool:
    return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200


def readyz(port: int) -> str:
    """What a service says of its readiness, for a failure's message."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).text
    except httpx.HTTPError as exc:
        return f"no answer ({type(exc).__name__})"


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def children(parent: int) -> dict[str, int]:
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == parent and b"serve" in cmdline:
            found[cmdline[cmdline.index(b"serve") + 1].decode()] = int(stat.parent.name)
    return found


def test_each_paging_alert_fires_on_its_real_failure_and_none_while_healthy(tmp_path):
    prometheus_binary = tool("prometheus")
    ports = {(name, p.name): free_port()
             for name, spec in discover_services().items() for p in spec.ports}
    moves = [arg for (name, kind), number in ports.items()
             for arg in ("--port", f"{name}.{kind}={number}")]
    metrics = {name: number for (name, kind), number in ports.items() if kind == "metrics"}
    kafka_port, extra_metrics = free_port(), free_port()
    data = tmp_path / "data"
    behaviour = Behaviour(chunk_delay_s=0)
    with Served(fake_upstream(behaviour)) as upstream:
        env = {**os.environ, "ROUTEMESH_UPSTREAM_BASE_URL": f"{upstream.url}/v1",
               # A new audit file every batch: a directory that can no longer be written
               # fails the next batch, not only the next day.
               "ROUTEMESH_AUDIT_MAX_FILE_BYTES": "1"}
        mesh = subprocess.Popen(
            [*CLI, "dev", "--data-dir", str(data), "--kafka-port", str(kafka_port), *moves],
            stdout=(tmp_path / "dev.out").open("wb"), stderr=subprocess.STDOUT, env=env)
        # A service outside the supervisor, so that a SIGKILL leaves it down.
        killed = subprocess.Popen(
            [*CLI, "serve", "replay-worker"], stdout=(tmp_path / "killed.log").open("wb"),
            stderr=subprocess.STDOUT,
            env={**env, "ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
                 "ROUTEMESH_KAFKA_IDEMPOTENT_PRODUCER": "false",
                 "ROUTEMESH_METRICS_PORT": str(extra_metrics),
                 "ROUTEMESH_METRICS_HOST": "127.0.0.1",
                 "ROUTEMESH_REPLAY_REPORT_DIR": str(tmp_path / "replays"),
                 "ROUTEMESH_INSTANCE_ID": "outside"})
        prometheus = Prometheus(prometheus_binary, tmp_path,
                                {**metrics, "replay-worker-outside": extra_metrics})
        gateway = f"http://127.0.0.1:{ports[('gateway', 'http')]}"
        try:
            for name, port in (*metrics.items(), ("replay-worker-outside", extra_metrics)):
                try:
                    until(lambda port=port: ready(port), 240, f"{name} ready")
                except AssertionError:
                    raise AssertionError(f"{name} not ready: {readyz(port)}\n" + tail(
                        tmp_path / ("killed.log" if name.endswith("outside") else "dev.out"))
                    ) from None
            with httpx.Client(base_url=gateway, timeout=30) as client:

                def chats(n: int, model: str = "auto") -> list[int]:
                    return [client.post("/v1/chat/completions", json={
                        "model": model, "messages": [{"role": "user", "content": f"q {i}"}]}
                    ).status_code for i in range(n)]

                # Healthy: traffic, and no page over a few evaluation windows.
                assert set(chats(60)) == {200}
                time.sleep(30)
                assert [a for a in prometheus.firing()
                        if a["labels"]["severity"] == "page"] == []

                # 30 empty answers from one model: its drift is severe.
                behaviour.content_by_model["small-model"] = ""
                assert set(chats(30, "lite")) == {200}
                prometheus.until_firing("RoutemeshDriftSevere", subject="small-model")
                behaviour.content_by_model.clear()

                # The upstream answers 500s: most requests end in a 5xx.
                behaviour.failing_models = {"small-model", "large-model"}
                assert set(chats(30)) == {502}
                prometheus.until_firing("RoutemeshGateway5xx")
                behaviour.failing_models = set()

                # The audit directory cannot be written: the writer retries, writes nothing
                # and commits nothing while events keep coming.
                audit = data / "audit"
                shutil.move(audit, data / "audit-away")
                audit.write_text("not a directory")
                for _ in range(6):
                    chats(10)
                    time.sleep(2)
                prometheus.until_firing("RoutemeshAuditWriterNotWriting")
                prometheus.until_firing("RoutemeshConsumerStalled",
                                        group="routemesh-audit-writer")

                # A consumer frozen (SIGSTOP): its scrape fails, it is down.
                scorer = children(mesh.pid)["scorer"]
                os.kill(scorer, signal.SIGSTOP)
                try:
                    prometheus.until_firing("RoutemeshServiceDown", service="scorer")
                finally:
                    os.kill(scorer, signal.SIGCONT)

                # A service killed outright.
                killed.send_signal(signal.SIGKILL)
                prometheus.until_firing("RoutemeshServiceDown", service="replay-worker-outside")
        finally:
            prometheus.stop()
            if killed.poll() is None:
                killed.kill()
            mesh.send_signal(signal.SIGINT)
            try:
                mesh.wait(90)
            except subprocess.TimeoutExpired:
                mesh.kill()
