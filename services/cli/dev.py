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


def parse_port_overrides(items: list[str]) -> dict[str, int]:
    overrides = {}
    for item in items:
        name, sep, port = item.partition("=")
        if not sep or not port.isdigit():
            raise ValueError(f"--metrics-port takes SERVICE=PORT, got {item!r}")
        overrides[name] = int(port)
    return overrides


@dataclass
class DevMesh:
    data_dir: Path
    config: Path | None
    kafka_port: int
    gateway_port: int
    metrics_ports: dict[str, int]
    specs: dict[str, ServiceSpec]
    broker: EmbeddedBroker | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self) -> list[tuple[str, str]]:
        """Start everything; return (name, address) lines, in start order."""
        unknown = set(self.metrics_ports) - set(self.specs)
        if unknown:
            raise ValueError(f"--metrics-port names unknown services: {', '.join(sorted(unknown))}")
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        qdrant_path = self.data_dir / "qdrant"
        qdrant_path.mkdir(parents=True, exist_ok=True)

        ports = {name: self.metrics_ports.get(name, spec.default_metrics_port)
                 for name, spec in self.specs.items()}
        wanted = [("gateway", self.gateway_port)] if "gateway" in self.specs else []
        wanted += [(f"{name} metrics", port) for name, port in ports.items()]
        taken = [
            f"{what} port {port}"
            for what, port in wanted
            if not port_is_free("127.0.0.1", port)
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
                ROUTEMESH_METRICS_HOST="127.0.0.1",
                ROUTEMESH_METRICS_PORT=str(ports[name]),
                ROUTEMESH_QDRANT_PATH=str(qdrant_path),
                ROUTEMESH_INSTANCE_ID=f"dev-{name}",
            )
            if self.config is not None:
                env["ROUTEMESH_ROUTER_CONFIG"] = str(self.config)
            if spec.dev_http_port is not None:
                env["ROUTEMESH_HTTP_PORT"] = str(self.gateway_port)
            env.update(spec.dev_env(str(self.data_dir)))
            with open(logs / f"{name}.log", "ab") as log_file:
                self.processes[name] = subprocess.Popen(
                    [sys.executable, "-m", "routemesh.services.cli.main", "serve", name],
                    env=env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            if spec.dev_http_port is not None:
                lines.append((name, f"http://127.0.0.1:{self.gateway_port}"))
            lines.append((f"{name} metrics", f"http://127.0.0.1:{ports[name]}/metrics"))
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
