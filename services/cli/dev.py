"""`routemesh dev`: the whole mesh on one machine, each component its own process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from routemesh.services.runtime.consumer import PartitionLogs
from routemesh.services.runtime.embedded_broker import EmbeddedBroker, port_is_free
from routemesh.services.runtime.service import ServiceSpec

STOP_TIMEOUT_S = 8.0
# Instance n (from 2) of a service listens on each of its ports plus (n - 1) times this.
REPLICA_PORT_STEP = 100
DRAIN_TIMEOUT_S = 30.0
MAX_BACKOFF_S = 30.0
RESET_AFTER_S = 60.0
HEALTH_CHECK_S = 2.0
UNHEALTHY_S = 10.0


def parse_port_overrides(
    items: list[str], specs: dict[str, ServiceSpec]
) -> dict[tuple[str, str], int]:
    """``SERVICE.PORT=NUMBER`` items (``gateway.http=8081``) checked against the ports the
    services declare."""
    overrides = {}
    for item in items:
        where, sep, number = item.partition("=")
        service, dot, port = where.partition(".")
        if not sep or not dot or not number.isdigit() or not 0 < int(number) < 65536:
            raise ValueError(f"--port takes SERVICE.PORT=NUMBER (gateway.http=8081), "
                             f"got {item!r}")
        declared = {p.name for p in specs[service].ports} if service in specs else set()
        if port not in declared:
            known = ", ".join(f"{n}.{p.name}" for n, s in specs.items() for p in s.ports)
            raise ValueError(f"--port {item!r}: no such service port; known: {known}")
        overrides[(service, port)] = int(number)
    return overrides


def parse_replicas(items: list[str], specs: dict[str, ServiceSpec]) -> dict[str, int]:
    """``SERVICE=N`` items (``audit-writer=2``): how many instances of a service to run."""
    replicas = {}
    for item in items:
        service, sep, number = item.partition("=")
        if not sep or not number.isdigit() or not 1 <= int(number) <= 9:
            raise ValueError(f"--replicas takes SERVICE=N with N from 1 to 9 "
                             f"(audit-writer=2), got {item!r}")
        if service not in specs:
            raise ValueError(f"--replicas {item!r}: no such service; known: "
                             f"{', '.join(specs)}")
        replicas[service] = int(number)
    return replicas


def instance_names(name: str, count: int) -> list[str]:
    """``scorer``, then ``scorer-2``, ``scorer-3``..."""
    return [name if n == 1 else f"{name}-{n}" for n in range(1, count + 1)]


@dataclass
class Supervised:
    """A service process and how to start it again."""

    # What `routemesh serve` runs, and this instance of it (the name unless replicated).
    name: str
    spec: ServiceSpec
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    # When a dead process is started again (monotonic); None while it runs.
    restart_at: float | None = None
    # Since when its /healthz has failed (monotonic), and when it was told to stop.
    unhealthy_since: float | None = None
    stopping_since: float | None = None
    instance: str = ""

    def __post_init__(self) -> None:
        self.instance = self.instance or self.name

    def launch(self) -> None:
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "routemesh.services.cli.main", "serve", self.name],
                env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.started_at = time.monotonic()
        self.restart_at = self.unhealthy_since = self.stopping_since = None

    def backoff_s(self) -> float:
        """Doubling from 1 s to 30 s; a run of a minute or more starts it over."""
        if time.monotonic() - self.started_at >= RESET_AFTER_S:
            self.restarts = 0
        self.restarts += 1
        return float(min(2 ** (self.restarts - 1), MAX_BACKOFF_S))

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def wait(self, deadline: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class DevMesh:
    data_dir: Path
    config: Path | None
    kafka_port: int
    port_overrides: dict[tuple[str, str], int]
    specs: dict[str, ServiceSpec]
    # Instances per service (1 unless given).
    replicas: dict[str, int] = field(default_factory=dict)
    broker: EmbeddedBroker | None = None
    services: dict[str, Supervised] = field(default_factory=dict)
    # Where a supervisor's lines go (the terminal of `routemesh dev`).
    say: Callable[[str], None] = print
    _health_checked: float = 0.0

    def instances(self) -> list[tuple[str, ServiceSpec]]:
        """(instance name, its service) in start order."""
        return [(instance, spec) for name, spec in self.specs.items()
                for instance in instance_names(name, self.replicas.get(name, 1))]

    def ports(self) -> dict[tuple[str, str], int]:
        """Every (instance, port name) to the number it listens on here."""
        found = {}
        for name, spec in self.specs.items():
            for n, instance in enumerate(instance_names(name, self.replicas.get(name, 1))):
                for port in spec.ports:
                    base = self.port_overrides.get((name, port.name), port.default)
                    found[(instance, port.name)] = base + n * REPLICA_PORT_STEP
        return found

    def environment(self, name: str, spec: ServiceSpec, ports: dict[tuple[str, str], int],
                    bootstrap: str) -> dict[str, str]:
        """What instance ``name`` of ``spec`` runs with."""
        env = dict(os.environ)
        env.update(
            ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS=bootstrap,
            ROUTEMESH_KAFKA_IDEMPOTENT_PRODUCER="false",
            ROUTEMESH_QDRANT_PATH=str(self.data_dir / "qdrant"),
            ROUTEMESH_INSTANCE_ID=f"dev-{name}",
            ROUTEMESH_DEAD_LETTER_DIR=str(self.data_dir / "dead-letters" / name),
        )
        for port in spec.ports:
            env[port.env] = str(ports[(name, port.name)])
            env[port.host_env] = "127.0.0.1"
        if self.config is not None:
            env["ROUTEMESH_ROUTER_CONFIG"] = str(self.config)
        env.update(spec.dev_env(self.data_dir, name))
        if self.replicas.get(spec.name, 1) > 1:
            env.update(spec.scale_out_env)
        return env

    def start(self) -> list[tuple[str, str]]:
        """Start everything; return (name, address) lines, in start order."""
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        qdrant_path = self.data_dir / "qdrant"
        qdrant_path.mkdir(parents=True, exist_ok=True)

        ports = self.ports()
        taken = [
            f"{service} {name} port {number}"
            for (service, name), number in ports.items()
            if not port_is_free("127.0.0.1", number)
        ]
        if taken:
            raise ValueError(f"already in use: {', '.join(taken)}")

        self.broker = EmbeddedBroker(self.kafka_port, log_file=logs / "kafka.log")
        self.broker.start()
        lines = [("kafka", self.broker.bootstrap), ("qdrant", f"{qdrant_path} (local mode)")]

        for name, spec in self.instances():
            env = self.environment(name, spec, ports, self.broker.bootstrap)
            service = self.services[name] = Supervised(spec.name, spec, env,
                                                       logs / f"{name}.log", instance=name)
            service.launch()
            for port in spec.ports:
                address = f"http://127.0.0.1:{ports[(name, port.name)]}"
                if port.name == "metrics":
                    lines.append((f"{name} metrics", f"{address}/metrics"))
                else:
                    label = name if port.name == "http" else f"{name} {port.name}"
                    lines.append((label, address))
        lines.append(("logs", str(logs)))
        return lines

    def wait(self) -> str | None:
        """Supervise until Ctrl-C / SIGTERM (returns None) or the broker dies (returns
        why): a service that exits is started again after a backoff, as a supervisor
        would, while the others go on serving."""
        received: list[int] = []
        previous = {
            s: signal.signal(s, lambda signum, _frame: received.append(signum))
            for s in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            while not received:
                self.supervise()
                if self.broker and self.broker.process and self.broker.process.poll() is not None:
                    return "the embedded broker exited"
                time.sleep(0.2)
            return None
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def supervise(self) -> None:
        """One round: note every service that died; start again those whose wait is over;
        stop one whose /healthz has failed for UNHEALTHY_S (a liveness probe's job)."""
        now = time.monotonic()
        check_health = now - self._health_checked >= HEALTH_CHECK_S
        if check_health:
            self._health_checked = now
        ports = self.ports()
        for service in self.services.values():
            process = service.process
            if process is None:
                continue
            if process.poll() is None:
                if check_health:
                    self._check_health(service, ports[(service.instance, "metrics")], now)
                continue
            if service.restart_at is None:
                delay = service.backoff_s()
                service.restart_at = now + delay
                self.say(f"{service.instance} exited with code {process.returncode}; "
                         f"starting it again in {delay:.0f} s (see {service.log})")
            elif now >= service.restart_at:
                service.launch()
                self.say(f"{service.instance} started again")

    def _check_health(self, service: Supervised, port: int, now: float) -> None:
        if service.stopping_since is not None:
            if now - service.stopping_since > STOP_TIMEOUT_S and service.process is not None:
                service.process.kill()
            return
        if healthz(f"http://127.0.0.1:{port}/healthz") != 503:
            service.unhealthy_since = None
            return
        if service.unhealthy_since is None:
            service.unhealthy_since = now
        elif now - service.unhealthy_since >= UNHEALTHY_S:
            self.say(f"{service.instance} failed its health check for {UNHEALTHY_S:.0f} s; "
                     "stopping it")
            service.stopping_since = now
            service.terminate()

    def stop(self) -> None:
        """Stop in order, so a broker that keeps nothing loses nothing: the front door
        first (what it holds is published), then, once every consumer has read to the
        end of its topics (within DRAIN_TIMEOUT_S), the consumers, then the broker."""
        front = [s for s in self.services.values() if s.spec.front_door]
        rest = [s for s in self.services.values() if not s.spec.front_door]
        for group in (front, rest):
            for service in group:
                service.terminate()
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for service in group:
                service.wait(deadline)
            if group is front and rest:
                self.drain(rest)
        if self.broker is not None:
            self.broker.stop(timeout_s=1.0)

    def drain(self, consumers: list[Supervised]) -> None:
        """Wait until every consumer group has read every partition of the topics it
        subscribes to the end the broker holds, at most DRAIN_TIMEOUT_S. The ends come
        from the broker, not from each instance's own unread count, which rests on what
        its last fetch saw and is silent about a partition held by an instance that died
        and is not expired yet."""
        ports = self.ports()
        urls = [f"http://127.0.0.1:{ports[(s.instance, 'metrics')]}/metrics" for s in consumers
                if s.process is not None and s.process.poll() is None]
        if self.broker is None or not urls:
            return
        if not asyncio.run(drained(urls, PartitionLogs(self.broker.settings()))):
            self.say(f"the consumers did not read to the end within {DRAIN_TIMEOUT_S:.0f} s; "
                     "stopping them anyway")


async def drained(urls: list[str], logs: PartitionLogs,
                  timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
    """Whether the consumers behind ``urls`` read to the end within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reports = [positions(url) for url in urls]
        if all(report is not None for report in reports):
            merged = Positions.merge([r for r in reports if r is not None])
            if merged.reached(await logs.ends({topic for _, topic in merged.subscribed})):
                return True
        await asyncio.sleep(0.2)
    return False


@dataclass
class Positions:
    """What consumers report of where they read: the (group, topic) pairs they subscribe
    to, and the next offset each group reads per partition held."""

    subscribed: set[tuple[str, str]] = field(default_factory=set)
    read: dict[tuple[str, str, int], float] = field(default_factory=dict)

    @classmethod
    def merge(cls, reports: list[Positions]) -> Positions:
        merged = cls()
        for report in reports:
            merged.subscribed |= report.subscribed
            for key, offset in report.read.items():
                merged.read[key] = max(offset, merged.read.get(key, offset))
        return merged

    def reached(self, ends: dict[tuple[str, int], int]) -> bool:
        """Whether every group has read every partition it subscribes to up to ``ends``
        (a partition nobody holds has nothing read)."""
        return all(end == 0 or self.read.get((group, topic, partition), -1) >= end
                   for group, subscribed in self.subscribed
                   for (topic, partition), end in ends.items() if topic == subscribed)


def healthz(url: str) -> int | None:
    """The status /healthz answers; None when nothing answers (still starting)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def positions(url: str) -> Positions | None:
    """A service's ``routemesh_consumer_assigned_partitions`` and
    ``routemesh_consumer_read_offset`` (nothing for a service that consumes nothing);
    None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except urllib.error.HTTPError:
        return Positions()
    except OSError:
        return None
    found = Positions()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if family.name == "routemesh_consumer_assigned_partitions":
                found.subscribed.add((labels["group"], labels["topic"]))
            elif family.name == "routemesh_consumer_read_offset":
                key = (labels["group"], labels["topic"], int(labels["partition"]))
                found.read[key] = sample.value
    return found
