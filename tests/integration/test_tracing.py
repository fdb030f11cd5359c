"""One trace from the HTTP request to the audit line: the gateway's spans and the audit
writer's consumer span arrive at an OTLP receiver in the same trace."""

import asyncio
import signal
import time

import httpx
import pytest

from tests.integration.conftest import start_gateway, start_service, wait_until_ready
from tests.integration.otlp_sink import OtlpSink
from tests.services.gateway.conftest import Behaviour, Served, fake_upstream

pytestmark = [pytest.mark.broker, pytest.mark.model]


async def test_the_audit_writers_span_is_in_the_trace_of_the_gateway_request(settings, tmp_path):
    audit_dir = tmp_path / "audit"
    with OtlpSink() as sink, Served(fake_upstream(Behaviour())) as upstream:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"}
        writer, writer_metrics, writer_log = start_service(
            "audit-writer", settings, tmp_path, ROUTEMESH_AUDIT_DIR=str(audit_dir),
            ROUTEMESH_AUDIT_JOIN_WINDOW_S="2", **otel)
        gateway, port, metrics, log = start_gateway(
            settings, tmp_path, f"{upstream.url}/v1", ROUTEMESH_AUTH_ENABLED="false", **otel)
        try:
            await wait_until_ready(metrics, gateway, log)
            await wait_until_ready(writer_metrics, writer, writer_log)
            response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={
                "model": "auto", "messages": [{"role": "user", "content": "hello"}]},
                timeout=30)
            assert response.status_code == 200
            deadline = time.monotonic() + 60
            while not any(audit_dir.glob("*.jsonl")) or not (
                next(audit_dir.glob("*.jsonl")).read_text()
            ):
                assert time.monotonic() < deadline, "no audit record"
                await asyncio.sleep(0.2)
        finally:
            for process in (gateway, writer):
                process.send_signal(signal.SIGTERM)
            assert [p.wait(30) for p in (gateway, writer)] == [0, 0]

        def traces_of(service: str, name_prefix: str) -> set[bytes]:
            return {span.trace_id for s, span in sink.spans()
                    if s == service and span.name.startswith(name_prefix)}

        deadline = time.monotonic() + 10
        while not traces_of("routemesh-audit-writer", "") and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    (request_trace,) = traces_of("routemesh-gateway", "POST /v1/chat/completions")
    consumed = traces_of("routemesh-audit-writer", settings.topic_prefix)
    assert request_trace in consumed, "the audit writer continued the request's trace"
    producer_spans = {span.span_id for s, span in sink.spans()
                      if s == "routemesh-gateway" and span.name.endswith(" publish")}
    consumer_parents = {span.parent_span_id for s, span in sink.spans()
                        if s == "routemesh-audit-writer" and span.trace_id == request_trace}
    assert consumer_parents <= producer_spans, "each consumer span is a child of a publish span"
