"""`routemesh dev` on free ports: prints where each component listens, serves every
registered topic, and stops on Ctrl-C within 10 s with no traceback."""

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import httpx
import pytest

from routemesh.contracts import TOPICS
from routemesh.services.cli.dev import DRAIN_TIMEOUT_S, STOP_TIMEOUT_S
from routemesh.services.runtime.embedded_broker import free_port
from routemesh.services.runtime.service import discover_services
from tests.integration.conftest import CLI
from tests.integration.test_embedded_broker import asyncio_run_list_topics
from tests.readme import documented_metrics, served_metrics
from tests.services.gateway.conftest import Behaviour, Served, fake_upstream

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
        code = process.wait(timeout=2 * STOP_TIMEOUT_S + DRAIN_TIMEOUT_S + 15)
        elapsed = time.monotonic() - stopped_at
    finally:
        if process.poll() is None:
            process.kill()
    rest = process.stdout.read()
    assert code == 0, rest
    _assert_metrics_as_documented(pages)
    # The front door gets STOP_TIMEOUT_S, the consumers their drain and STOP_TIMEOUT_S
    # together, then the broker its second; an idle mesh drains at once.
    assert elapsed < 2 * STOP_TIMEOUT_S + 2
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


def _children(parent: int) -> dict[str, int]:
    """The services `routemesh dev` runs, by name, from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == parent and b"serve" in cmdline:
            found[cmdline[cmdline.index(b"serve") + 1].decode()] = int(stat.parent.name)
    return found


def test_dev_restarts_a_dead_service_and_a_stop_under_traffic_loses_no_audit_record(
        tmp_path):
    """Two audit writers in one group (`--replicas`), and two drift detectors (which
    `--replicas` puts on their changelog store); one writer SIGKILLed is started again
    while the gateway goes on serving; Ctrl-C under traffic stops the gateway first and
    lets the consumers read to the end of the memory-only broker, so every answered
    request has its audit record, once."""
    behaviour = Behaviour(chunk_delay_s=0)
    ports = {(name, p.name): free_port()
             for name, spec in discover_services().items() for p in spec.ports}
    moves = [arg for (name, kind), number in ports.items()
             for arg in ("--port", f"{name}.{kind}={number}")]
    gateway = f"http://127.0.0.1:{ports[('gateway', 'http')]}"
    data = tmp_path / "data"
    with Served(fake_upstream(behaviour)) as upstream:
        env = {**os.environ, "ROUTEMESH_UPSTREAM_BASE_URL": f"{upstream.url}/v1"}
        process = subprocess.Popen(
            [*CLI, "dev", "--data-dir", str(data), "--kafka-port", str(free_port()), *moves,
             "--replicas", "audit-writer=2", "--replicas", "drift-detector=2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        said: list[str] = []
        reader = threading.Thread(target=lambda: said.extend(process.stdout), daemon=True)
        reader.start()
        answered: list[str] = []
        writers = ports[("audit-writer", "metrics")]
        detectors = ports[("drift-detector", "metrics")]
        try:
            for name, port in (("gateway", ports[("gateway", "metrics")]),
                               ("audit-writer", writers), ("audit-writer-2", writers + 100),
                               ("drift-detector", detectors),
                               ("drift-detector-2", detectors + 100)):
                deadline = time.monotonic() + 180
                while _get(f"http://127.0.0.1:{port}/readyz") != 200:
                    assert time.monotonic() < deadline, f"{name} never became ready"
                    time.sleep(0.5)
            os.kill(_children(process.pid)["audit-writer"], signal.SIGKILL)
            with httpx.Client(base_url=gateway, timeout=30) as client:
                def chat() -> None:
                    response = client.post("/v1/chat/completions", json={
                        "model": "auto", "messages": [{"role": "user", "content": "hi"}]})
                    assert response.status_code == 200, response.text
                    answered.append(response.headers["x-routemesh-request-id"])

                for _ in range(100):
                    chat()
                deadline = time.monotonic() + 60
                while not any(line.startswith("audit-writer") and "started again" in line
                              for line in said):
                    assert time.monotonic() < deadline, said
                    time.sleep(0.2)
                assert any(line.startswith("audit-writer") and "exited with code -9" in line
                           for line in said)

                stop = threading.Event()

                def traffic() -> None:
                    with contextlib.suppress(httpx.HTTPError, AssertionError):
                        while not stop.is_set():
                            chat()

                sender = threading.Thread(target=traffic)
                sender.start()
                while len(answered) < 150:
                    time.sleep(0.05)
                process.send_signal(signal.SIGINT)
                assert process.wait(2 * STOP_TIMEOUT_S + DRAIN_TIMEOUT_S + 15) == 0
                stop.set()
                sender.join(30)
        finally:
            if process.poll() is None:
                process.kill()
    records = [json.loads(line) for path in (data / "audit").glob("*.jsonl")
               for line in path.read_text().splitlines()]
    audited = Counter(r["request_id"] for r in records if r["join"] != "amendment")
    assert len(answered) >= 150
    assert set(answered) <= set(audited), (
        f"{len(set(answered) - set(audited))} answered, not audited; dev said:\n"
        + "".join(said))
    assert audited.most_common(1)[0][1] == 1, audited.most_common(3)


EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"


def _wait_for(condition, what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_dev_learns_routes_from_reviewed_traffic_and_refuses_a_contradicting_batch(
        tmp_path):
    """The learning loop as users run it: prompts sent through `routemesh dev` with review
    capture on, outcomes naming the expected route posted, `routemesh learn --announce`
    → the gate passes, the running gateway serves the learned bank, and the same prompts'
    live accuracy rises. Then a batch of contradicting labels is refused, and the bank
    stays."""
    config = EXAMPLES / "multi-route.yaml"
    rows = [json.loads(line) for line in
            (EXAMPLES / "multi-route.eval.jsonl").read_text().splitlines()]
    ports = {(name, p.name): free_port()
             for name, spec in discover_services().items() for p in spec.ports}
    moves = [arg for (name, kind), number in ports.items()
             for arg in ("--port", f"{name}.{kind}={number}")]
    data = tmp_path / "data"
    bootstrap = f"127.0.0.1:{free_port()}"
    with Served(fake_upstream(Behaviour(chunk_delay_s=0))) as upstream:
        env = {**os.environ, "ROUTEMESH_UPSTREAM_BASE_URL": f"{upstream.url}/v1",
               "ROUTEMESH_REVIEW_CAPTURE": "raw_local"}
        process = subprocess.Popen(
            [*CLI, "dev", "--config", str(config), "--data-dir", str(data), "--kafka-port",
             bootstrap.rsplit(":", 1)[1], *moves],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        said: list[str] = []
        threading.Thread(target=lambda: said.extend(process.stdout), daemon=True).start()
        try:
            for name, kind in (("gateway", "metrics"), ("audit-writer", "metrics")):
                _wait_for(lambda port=ports[(name, kind)]:
                          _get(f"http://127.0.0.1:{port}/readyz") == 200,
                          f"{name} never became ready")
            with httpx.Client(base_url=f"http://127.0.0.1:{ports[('gateway', 'http')]}",
                              timeout=60) as client:
                def routed(prompts: list[dict]) -> list[dict]:
                    return [client.post("/v1/route", json={"input": row["prompt"]}).json()
                            for row in prompts]

                # Reviewed traffic: every prompt the serving bank routes wrong, and
                # enough it routes right that each route has 3 reviews.
                first = routed(rows)
                wrong = [r for r, d in zip(rows, first, strict=True)
                         if d["route_id"] != r["route"]]
                assert wrong, "the shipped bank routes every eval prompt right"
                reviewed = list(wrong)
                for row in rows:
                    if sum(r["route"] == row["route"] for r in reviewed) < 3:
                        reviewed.append(row)

                def send_and_label(prompts: list[dict], label) -> None:
                    for row in prompts:
                        response = client.post("/v1/chat/completions", json={
                            "model": "auto",
                            "messages": [{"role": "user", "content": row["prompt"]}]})
                        assert response.status_code == 200, response.text
                        outcome = client.post("/v1/outcomes", json={
                            "request_id": response.headers["x-routemesh-request-id"],
                            "expected_route": label(row)})
                        assert outcome.status_code == 202, outcome.text

                def outcomes_audited() -> int:
                    return sum('"join":"outcome"' in line
                               for path in (data / "audit").glob("*.jsonl")
                               for line in path.read_text().splitlines())

                send_and_label(reviewed, lambda row: row["route"])
                _wait_for(lambda: outcomes_audited() >= len(reviewed),
                          "the outcomes never reached the audit")
                def right_now() -> int:
                    return sum(d["route_id"] == r["route"]
                               for r, d in zip(reviewed, routed(reviewed), strict=True))

                def learn(out: str) -> subprocess.CompletedProcess[str]:
                    return subprocess.run(
                        [*CLI, "learn", "--config", str(config), "--audit-dir",
                         str(data / "audit"), "--captures", str(data / "review"), "--out",
                         str(tmp_path / out), "--announce"],
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "ROUTEMESH_QDRANT_PATH": str(data / "qdrant"),
                             "ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS": bootstrap})

                before = right_now()
                learned = learn("learn")
                assert learned.returncode == 0, learned.stdout + learned.stderr
                assert "gate passed" in learned.stdout
                receipt = json.loads(next((tmp_path / "learn").glob("*/receipt.json"))
                                     .read_text())
                assert receipt["announced"]
                assert receipt["written"]
                assert sum(c["learned"] for c in receipt["routes"].values()) == len(reviewed)
                new_bank = receipt["route_bank_sha256_after"]
                _wait_for(lambda: routed(reviewed[:1])[0]["route_bank_sha256"] == new_bank,
                          "the gateway never served the learned bank")
                after = right_now()
                assert after > before, (before, after, len(reviewed))

                # A contradicting batch: prompts the bank routes right, labelled as the
                # next route over.
                routes = sorted({r["route"] for r in rows})
                right = [r for r, d in zip(rows, first, strict=True)
                         if d["route_id"] == r["route"] and r not in reviewed][:60]
                send_and_label(right, lambda row: routes[(routes.index(row["route"]) + 1)
                                                         % len(routes)])
                _wait_for(lambda: outcomes_audited() >= len(reviewed) + len(right),
                          "the contradicting outcomes never reached the audit")
                refused = learn("refused")
                assert refused.returncode == 1, refused.stdout + refused.stderr
                assert "poisoned batch" in refused.stderr
                assert routed(reviewed[:1])[0]["route_bank_sha256"] == new_bank
            process.send_signal(signal.SIGINT)
            assert process.wait(2 * STOP_TIMEOUT_S + DRAIN_TIMEOUT_S + 15) == 0
        finally:
            if process.poll() is None:
                process.kill()
    # Never the prompt: the receipts name texts by hash only.
    for path in (tmp_path / "learn").glob("*/*.json"):
        text = path.read_text()
        assert not any(row["prompt"] in text for row in reviewed), path
