"""Traces, structured logs, and the metrics/health HTTP endpoint every service serves."""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from prometheus_client import CollectorRegistry, disable_created_metrics, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from routemesh.services.runtime.settings import ServiceSettings

log = logging.getLogger(__name__)
M = TypeVar("M")
_REGISTERED: weakref.WeakKeyDictionary[CollectorRegistry, dict[object, Any]] = (
    weakref.WeakKeyDictionary()
)


def registered(registry: CollectorRegistry, metrics: Callable[[CollectorRegistry], M]) -> M:
    """One instance of a class of metrics per registry: every component of a kind in a
    process (two publishers, two consumers) writes to the same series under its labels,
    where registering the series twice would be an error."""
    made = _REGISTERED.setdefault(registry, {})
    if metrics not in made:
        made[metrics] = metrics(registry)
    found: M = made[metrics]
    return found


def setup_tracing(service: str, settings: ServiceSettings) -> TracerProvider:
    """A TracerProvider whose Resource honours OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES.

    Spans are recorded and exported over OTLP/HTTP only when an endpoint is configured;
    otherwise they are not recorded, but trace ids still reach logs and Kafka headers.
    """
    attributes = {SERVICE_NAME: settings.otel_service_name or f"routemesh-{service}"}
    if settings.instance_id:
        attributes[SERVICE_INSTANCE_ID] = settings.instance_id
    resource = Resource.create(attributes)
    if settings.otel_exporter_otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based, always on);
        # the exporter reads the endpoint and headers from the standard OTEL_* variables.
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        # Nothing would receive the spans, so none is recorded: ids are still made and
        # reach logs and Kafka headers, but recording costs the gateway's event loop
        # time on every span of every request (bench/gateway.py).
        provider = TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    trace.set_tracer_provider(provider)
    return provider


def records_spans(provider: trace.TracerProvider | None) -> bool:
    """Whether spans made with ``provider`` are recorded (and so worth making)."""
    provider = provider or trace.get_tracer_provider()
    return getattr(provider, "sampler", None) is not ALWAYS_OFF


_RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the active trace and span ids.

    Hand-written rather than a logging library because it is a dozen lines and must add
    the OTel ids from the current context; msgspec does the encoding.
    """

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self._encoder = msgspec.json.Encoder(enc_hook=str)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            entry["exc"] = self.formatException(record.exc_info)
        return self._encoder.encode(entry).decode()


def setup_logging(service: str, level: str) -> None:
    """JSON lines on stderr. ``level`` below INFO applies to routemesh's own loggers only:
    libraries log what they carry at DEBUG (aiokafka the value of every message it
    sends), and a debugging session must not put prompts in the logs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.getLevelName(level), logging.INFO))
    logging.getLogger("routemesh").setLevel(level)


class Readiness:
    """What a service says of its health, updated by the service, read by the HTTP thread.

    - readiness checks (``set``): all must pass for ``/readyz`` to answer 200 (can the
      service do its job: take traffic, consume);
    - status notes (``note``): shown in ``/readyz`` but never failing it (the gateway
      keeps serving through a Kafka outage, so Kafka is a note there, not a check);
    - liveness (``set_alive`` and the event loop's ``beat``): ``/healthz`` answers 503
      when a check fails or the loop has not beaten for ``stall_s``, so Kubernetes
      restarts a process whose consume loop died or whose event loop is stuck.
    """

    def __init__(self, stall_s: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._checks: dict[str, tuple[bool, str]] = {}
        self._notes: dict[str, tuple[bool, str]] = {}
        self._alive: dict[str, tuple[bool, str]] = {}
        self.stall_s = stall_s
        self._beat: float | None = None

    def set(self, name: str, ok: bool, detail: str = "") -> None:
        with self._lock:
            self._checks[name] = (ok, detail)

    def note(self, name: str, ok: bool, detail: str = "") -> None:
        with self._lock:
            self._notes[name] = (ok, detail)

    def set_alive(self, name: str, ok: bool, detail: str = "") -> None:
        with self._lock:
            self._alive[name] = (ok, detail)

    def beat(self) -> None:
        self._beat = time.monotonic()

    def snapshot(self) -> tuple[bool, dict[str, dict[str, object]]]:
        with self._lock:
            checks = dict(self._checks)
        ready = bool(checks) and all(ok for ok, _ in checks.values())
        return ready, _described(checks)

    def status(self) -> dict[str, dict[str, object]]:
        with self._lock:
            return _described(self._notes)

    def liveness(self) -> tuple[bool, dict[str, dict[str, object]]]:
        with self._lock:
            checks = dict(self._alive)
        beat = self._beat
        if beat is not None:
            since = time.monotonic() - beat
            checks["event_loop"] = (since <= self.stall_s,
                                    "" if since <= self.stall_s else
                                    f"the event loop has not run for {since:.0f} s")
        return all(ok for ok, _ in checks.values()), _described(checks)


def _described(checks: dict[str, tuple[bool, str]]) -> dict[str, dict[str, object]]:
    return {name: {"ok": ok, "detail": d} for name, (ok, d) in checks.items()}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
        pass


def _health_app(registry: CollectorRegistry, readiness: Readiness) -> WSGIApplication:
    metrics = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            alive, checks = readiness.liveness()
            start_response(
                "200 OK" if alive else "503 Service Unavailable",
                [("Content-Type", "application/json")],
            )
            return [msgspec.json.encode({"status": "alive" if alive else "failing",
                                         "checks": checks})]
        if path == "/readyz":
            ready, checks = readiness.snapshot()
            body = msgspec.json.encode({"ready": ready, "checks": checks,
                                        "status": readiness.status()})
            start_response(
                "200 OK" if ready else "503 Service Unavailable",
                [("Content-Type", "application/json")],
            )
            return [body]
        if path == "/metrics":
            page: Iterable[bytes] = metrics(environ, start_response)
            return page
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    return app


class MetricsServer:
    """/metrics, /healthz and /readyz on one port, served from a daemon thread."""

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, readiness: Readiness
    ) -> None:
        # A `_created` series beside every counter doubles what a scrape carries for a
        # timestamp nothing of ours reads.
        disable_created_metrics()
        self._server = make_server(
            host, port, _health_app(registry, readiness), ThreadingWSGIServer, _QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return self._server.server_port

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
