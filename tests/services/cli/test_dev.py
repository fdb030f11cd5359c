"""`routemesh dev`'s supervisor without a broker: a service that exits is started again
after a backoff; one whose /healthz keeps failing is stopped (and so started again). The
whole mesh under it runs in tests/integration/test_dev.py."""

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from routemesh.services.audit_writer.service import SPEC as AUDIT
from routemesh.services.cli.dev import (
    UNHEALTHY_S,
    DevMesh,
    Positions,
    Supervised,
    parse_replicas,
    positions,
)
from routemesh.services.gateway.service import SPEC as GATEWAY
from routemesh.services.runtime.service import ServiceSpec, metrics_port
from routemesh.services.runtime.settings import ServiceSettings
from routemesh.services.scorer.service import SPEC as SCORER

SPEC = ServiceSpec("unit", ServiceSettings, lambda ctx: None, (metrics_port(9999),))


class Health(BaseHTTPRequestHandler):
    status = 503

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


class Sleeper(Supervised):
    """A service that is a plain sleeping process."""

    def launch(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.started_at = time.monotonic()
        self.restart_at = self.unhealthy_since = self.stopping_since = None


def mesh(tmp_path, port: int) -> tuple[DevMesh, Sleeper, list[str]]:
    said: list[str] = []
    dev = DevMesh(tmp_path, None, 0, {("unit", "metrics"): port}, {"unit": SPEC},
                  say=said.append)
    service = dev.services["unit"] = Sleeper("unit", SPEC, {}, tmp_path / "unit.log")
    service.launch()
    return dev, service, said


def test_a_service_that_exits_is_started_again_after_a_growing_backoff(tmp_path, health):
    dev, service, said = mesh(tmp_path, health.server_address[1])
    first = service.process
    first.kill()
    first.wait()
    dev.supervise()
    assert said == [f"unit exited with code -9; starting it again in 1 s (see {service.log})"]
    service.restart_at = time.monotonic()
    dev.supervise()
    assert service.process is not first
    assert service.process.poll() is None
    assert said[-1] == "unit started again"
    service.process.kill()
    service.process.wait()
    dev.supervise()
    assert "starting it again in 2 s" in said[-1], "a quick second death waits longer"
    dev.stop()


def test_a_service_whose_health_keeps_failing_is_stopped_then_started_again(
        tmp_path, health):
    dev, service, said = mesh(tmp_path, health.server_address[1])
    first = service.process
    dev.supervise()
    assert service.unhealthy_since is not None
    assert first.poll() is None, "one failed check is not enough"
    service.unhealthy_since -= UNHEALTHY_S
    dev._health_checked = 0.0
    dev.supervise()
    assert said[-1].startswith("unit failed its health check")
    assert first.wait(10) == -15
    dev.supervise()
    assert "starting it again" in said[-1]
    dev.stop()


def test_a_healthy_service_is_left_alone(tmp_path, health):
    Health.status = 200
    try:
        dev, service, said = mesh(tmp_path, health.server_address[1])
        dev.supervise()
        assert service.unhealthy_since is None
        assert said == []
        dev.stop()
    finally:
        Health.status = 503



def test_replicas_are_instances_of_one_service_on_ports_a_step_apart(tmp_path):
    specs = {"unit": SPEC, "single": ServiceSpec(
        "single", ServiceSettings, lambda ctx: None, (metrics_port(9998),))}
    assert parse_replicas(["unit=3"], specs) == {"unit": 3}
    dev = DevMesh(tmp_path, None, 0, {("unit", "metrics"): 9500}, specs, replicas={"unit": 3})
    assert [name for name, _ in dev.instances()] == ["unit", "unit-2", "unit-3", "single"]
    assert dev.ports() == {("unit", "metrics"): 9500, ("unit-2", "metrics"): 9600,
                           ("unit-3", "metrics"): 9700, ("single", "metrics"): 9998}
    assert parse_replicas(["single=1"], specs) == {"single": 1}
    for wrong in ("unit", "unit=0", "unit=x", "nosuch=2"):
        with pytest.raises(ValueError, match="--replicas"):
            parse_replicas([wrong], specs)


def test_a_service_that_scales_with_its_state_elsewhere_is_told_so_when_it_does(tmp_path):
    specs = {"scorer": SCORER}
    ports = {("scorer", "metrics"): 9104, ("scorer-2", "metrics"): 9204}
    alone = DevMesh(tmp_path, None, 0, {}, specs)
    assert "ROUTEMESH_SCORER_STATE_STORE" not in alone.environment(
        "scorer", SCORER, ports, "127.0.0.1:1")
    two = DevMesh(tmp_path, None, 0, {}, specs, replicas={"scorer": 2})
    for name in ("scorer", "scorer-2"):
        env = two.environment(name, SCORER, ports, "127.0.0.1:1")
        assert env["ROUTEMESH_SCORER_STATE_STORE"] == "changelog"


def test_replicas_share_what_their_service_shares_and_keep_what_is_their_own(tmp_path):
    """Audit writers write one trail; each gateway spools on its own (two appending to
    one spool would interleave their lines)."""
    assert AUDIT.dev_env(tmp_path, "audit-writer") == AUDIT.dev_env(tmp_path, "audit-writer-2")
    spools = {GATEWAY.dev_env(tmp_path, name)["ROUTEMESH_SPOOL_DIR"]
              for name in ("gateway", "gateway-2")}
    assert len(spools) == 2


def test_a_drain_waits_for_every_subscribed_partition_up_to_the_brokers_end():
    """What the consumers report read, against the ends the broker holds: a partition no
    live instance holds (a dead member not expired yet) is not read, whatever the
    others say; one that holds nothing needs nothing."""
    registry = CollectorRegistry()
    assigned = Gauge("routemesh_consumer_assigned_partitions", "", ["group", "topic"],
                     registry=registry)
    read = Gauge("routemesh_consumer_read_offset", "", ["group", "topic", "partition"],
                 registry=registry)
    assigned.labels("audit", "decisions").set(1)
    read.labels("audit", "decisions", "0").set(7)
    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = generate_latest(registry)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        report = positions(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
    assert report == Positions({("audit", "decisions")}, {("audit", "decisions", 0): 7})
    other = Positions({("audit", "decisions"), ("scorer", "decisions")},
                      {("audit", "decisions", 1): 4, ("scorer", "decisions", 0): 7,
                       ("scorer", "decisions", 1): 4})
    merged = Positions.merge([report, other])
    assert merged.reached({("decisions", 0): 7, ("decisions", 1): 4, ("decisions", 2): 0})
    assert not merged.reached({("decisions", 0): 8, ("decisions", 1): 4})
    assert not Positions.merge([report]).reached({("decisions", 0): 7, ("decisions", 1): 4})
    assert positions("http://127.0.0.1:9/metrics") is None
