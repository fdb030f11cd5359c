"""`routemesh dev`: the whole mesh on one machine, each component its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from routemesh.services.runtime.embedded_broker import EmbeddedBroker, port_is_free
from routemesh.services.runtime.service import ServiceSpec

STOP_TIMEOUT_S = 8.0


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


@dataclass
class DevMesh:
    data_dir: Path
    config: Path | None
    kafka_port: int
    port_overrides: dict[tuple[str, str], int]
    specs: dict[str, ServiceSpec]
    broker: EmbeddedBroker | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def ports(self) -> dict[tuple[str, str], int]:
        """Every (service, port name) to the number it listens on here."""
        return {
            (name, port.name): self.port_overrides.get((name, port.name), port.default)
            for name, spec in self.specs.items()
            for port in spec.ports
        }

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

        for name, spec in self.specs.items():
            env = dict(os.environ)
            env.update(
                ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS=self.broker.bootstrap,
                ROUTEMESH_KAFKA_IDEMPOTENT_PRODUCER="false",
                ROUTEMESH_QDRANT_PATH=str(qdrant_path),
                ROUTEMESH_INSTANCE_ID=f"dev-{name}",
            )
            for port in spec.ports:
                env[port.env] = str(ports[(name, port.name)])
                env[port.host_env] = "127.0.0.1"
            if self.config is not None:
                env["ROUTEMESH_ROUTER_CONFIG"] = str(self.config)
            env.update(spec.dev_env(self.data_dir))
            with open(logs / f"{name}.log", "ab") as log_file:
                self.processes[name] = subprocess.Popen(
                    [sys.executable, "-m", "routemesh.services.cli.main", "serve", name],
                    env=env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
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
        """Block until Ctrl-C / SIGTERM (returns None) or a service dies (returns why)."""
        received: list[int] = []
        previous = {
            s: signal.signal(s, lambda signum, _frame: received.append(signum))
            for s in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            while not received:
                for name, process in self.processes.items():
                    if process.poll() is not None:
                        return (
                            f"{name} exited with code {process.returncode}; "
                            f"see {self.data_dir / 'logs' / (name + '.log')}"
                        )
                if self.broker and self.broker.process and self.broker.process.poll() is not None:
                    return "the embedded broker exited"
                time.sleep(0.2)
            return None
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def stop(self) -> None:
        """SIGTERM every service, give them STOP_TIMEOUT_S together, then the broker."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.broker is not None:
            self.broker.stop(timeout_s=1.0)
