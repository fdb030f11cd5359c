import json
import logging
import urllib.error
import urllib.request

import pytest
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter

from routemesh.services.runtime.settings import ServiceSettings
from routemesh.services.runtime.telemetry import (
    JsonFormatter,
    MetricsServer,
    Readiness,
    setup_logging,
    setup_tracing,
)


def _record(message: str, **extra) -> logging.LogRecord:
    record = logging.makeLogRecord({"msg": message, "levelname": "INFO", "name": "t"})
    record.__dict__.update(extra)
    return record


def test_json_logs_carry_the_trace_and_span_ids():
    provider = setup_tracing("unit", ServiceSettings())
    formatter = JsonFormatter("unit")
    with provider.get_tracer("t").start_as_current_span("work") as span:
        line = formatter.format(_record("hello", route_id="lite"))
        context = span.get_span_context()
    entry = json.loads(line)
    assert entry["message"] == "hello"
    assert entry["service"] == "unit"
    assert entry["route_id"] == "lite"
    assert entry["trace_id"] == format(context.trace_id, "032x")
    assert entry["span_id"] == format(context.span_id, "016x")


def test_spans_are_recorded_only_when_an_exporter_is_configured(monkeypatch):
    quiet = setup_tracing("unit", ServiceSettings())
    with quiet.get_tracer("t").start_as_current_span("work") as span:
        assert span.get_span_context().is_valid
        assert not span.is_recording()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    exporting = setup_tracing("unit", ServiceSettings())
    # Never ended, so never exported to the closed port.
    assert exporting.get_tracer("t").start_span("work").is_recording()
    exporting.shutdown()


def test_debug_is_for_routemesh_loggers_never_for_libraries_that_log_payloads():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("routemesh").level)
    try:
        setup_logging("unit", "DEBUG")
        assert logging.getLogger("routemesh.services.gateway").isEnabledFor(logging.DEBUG)
        # aiokafka's producer logs the value of every message it sends at DEBUG.
        assert not logging.getLogger("aiokafka.producer.producer").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("aiokafka").isEnabledFor(logging.INFO)
        setup_logging("unit", "WARNING")
        assert not logging.getLogger("routemesh.x").isEnabledFor(logging.INFO)
        assert not logging.getLogger("aiokafka").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("routemesh").setLevel(saved[2])


def test_json_logs_without_a_span_have_no_trace_id():
    entry = json.loads(JsonFormatter("unit").format(_record("x")))
    assert "trace_id" not in entry


def test_resource_honours_otel_service_name(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    provider = setup_tracing("audit-writer", ServiceSettings())
    attributes = provider.resource.attributes
    assert attributes["service.name"] == "from-env"
    assert attributes["deployment.environment"] == "test"
    trace.get_tracer_provider()


def test_resource_defaults_to_the_service_name(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    provider = setup_tracing("audit-writer", ServiceSettings())
    assert provider.resource.attributes["service.name"] == "routemesh-audit-writer"


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def server():
    registry = CollectorRegistry()
    Counter("routemesh_unit_things_total", "things", registry=registry).inc(3)
    readiness = Readiness()
    metrics = MetricsServer("127.0.0.1", 0, registry, readiness)
    metrics.start()
    yield metrics, readiness
    metrics.stop()


def test_metrics_health_and_readiness_share_one_port(server):
    metrics, readiness = server
    status, body = _get(metrics.port, "/metrics")
    assert status == 200
    assert b"routemesh_unit_things_total 3.0" in body

    assert _get(metrics.port, "/healthz")[0] == 200

    status, body = _get(metrics.port, "/readyz")
    assert status == 503, "no check has reported yet, so not ready"
    readiness.set("kafka", True)
    readiness.set("qdrant", False, "connection refused")
    status, body = _get(metrics.port, "/readyz")
    assert status == 503
    assert json.loads(body)["checks"]["qdrant"] == {"ok": False, "detail": "connection refused"}
    readiness.set("qdrant", True)
    assert _get(metrics.port, "/readyz")[0] == 200

    assert _get(metrics.port, "/nope")[0] == 404
