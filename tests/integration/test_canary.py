"""Never the prompt, on any channel: a canary string in every part of the requests (system
and user messages, tool definitions, tool-call arguments, a tool result, a streamed
request, an upstream error, a malformed body) reaches no topic, spool, dead letter, log
line, metric, span, audit record, drift or scorer state, review candidate or packet.
Review capture is on (redacted) and the broker is paused, so events spill to the spool:
the one place the prompt may go is the review capture's own topic and directory, with its
secrets masked."""

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from typer.testing import CliRunner

from routemesh.contracts import TOPICS, decode_event
from routemesh.contracts.topics import PROMPTS_REVIEW, ROUTE_DECISIONS, ROUTE_SCORES
from routemesh.services.cli.main import app
from routemesh.services.runtime.settings import ServiceSettings
from tests.integration.conftest import start_gateway, start_service, wait_until_ready
from tests.integration.otlp_sink import OtlpSink
from tests.services.gateway.conftest import Behaviour, Served, fake_upstream

pytestmark = [pytest.mark.broker, pytest.mark.model, pytest.mark.slow]
CANARY = "CANARY-everywhere-9d41"
SECRET = "sk-canarysecret0123456789"
SERVICES = {"routemesh-gateway", "routemesh-audit-writer", "routemesh-scorer",
            "routemesh-drift-detector"}


def _requests() -> list[dict]:
    tool = {"type": "function", "function": {"name": "lookup", "description": f"finds {CANARY}",
                                             "parameters": {"type": "object"}}}
    return [
        {"model": "auto", "tools": [tool], "messages": [
            {"role": "system", "content": f"you are {CANARY}"},
            {"role": "user", "content": f"look up {CANARY} with key {SECRET}"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "t1", "type": "function",
                "function": {"name": "lookup", "arguments": json.dumps({"q": CANARY})}}]},
            {"role": "tool", "tool_call_id": "t1", "content": f"found {CANARY}"},
            {"role": "user", "content": f"summarise what you found about {CANARY} {SECRET}"},
        ]},
        {"model": "auto", "stream": True, "stream_options": {"include_usage": True},
         "messages": [{"role": "user", "content": f"stream me a poem about {CANARY}"}]},
    ]


async def _all_records(bootstrap: str, topics: list[str]) -> dict[str, list]:
    """Every record of ``topics`` from the start to their current end, without a group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        await consumer.topics()  # fetches the metadata partitions_for_topic reads
        partitions = [TopicPartition(topic, p) for topic in topics
                      for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        found: dict[str, list] = {topic: [] for topic in topics}
        while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
            for tp, batch in (await consumer.getmany(timeout_ms=500)).items():
                found[tp.topic] += batch
        return found
    finally:
        await consumer.stop()


def _files_under(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


async def test_the_canary_reaches_no_topic_spool_dead_letter_log_metric_span_or_audit(
    own_broker, tmp_path
):
    settings = ServiceSettings(kafka_bootstrap_servers=own_broker.bootstrap)
    behaviour = Behaviour(content=f"an answer that quotes {CANARY}",
                          error_message=f"the upstream quotes {CANARY} and {SECRET}")
    review_dir, audit_dir = tmp_path / "review", tmp_path / "audit"
    common = {"ROUTEMESH_LOG_LEVEL": "DEBUG", "OTEL_EXPORTER_OTLP_ENDPOINT": "",
              "OTEL_BSP_SCHEDULE_DELAY": "200"}
    with OtlpSink() as sink, Served(fake_upstream(behaviour)) as upstream:
        common["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint
        writer, writer_metrics, writer_log = start_service(
            "audit-writer", settings, tmp_path, ROUTEMESH_AUDIT_DIR=str(audit_dir),
            ROUTEMESH_AUDIT_JOIN_WINDOW_S="2", **common)
        scorer, scorer_metrics, scorer_log = start_service(
            "scorer", settings, tmp_path, ROUTEMESH_SCORER_STATE_DIR=str(tmp_path / "scorer"),
            ROUTEMESH_SCORER_PUBLISH_INTERVAL_S="0.5", **common)
        drift, drift_metrics, drift_log = start_service(
            "drift-detector", settings, tmp_path,
            ROUTEMESH_DRIFT_STATE_DIR=str(tmp_path / "drift"), **common)
        consumers = [(writer, writer_metrics, writer_log), (scorer, scorer_metrics, scorer_log),
                     (drift, drift_metrics, drift_log)]
        gateway, port, metrics, log = start_gateway(
            settings, tmp_path, f"{upstream.url}/v1", ROUTEMESH_AUTH_ENABLED="false",
            ROUTEMESH_PUBLISH_QUEUE_SIZE="1", ROUTEMESH_REVIEW_CAPTURE="redacted_topic",
            ROUTEMESH_REVIEW_DIR=str(review_dir), ROUTEMESH_UPSTREAM_API_KEY=SECRET, **common)
        chats = 0
        try:
            await wait_until_ready(metrics, gateway, log)
            for process, port_, log_ in consumers:
                await wait_until_ready(port_, process, log_)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                         timeout=60) as client:

                async def traffic() -> None:
                    nonlocal chats
                    for body in _requests():
                        response = await client.post("/v1/chat/completions", json=body)
                        assert response.status_code == 200, response.text
                        await response.aread()
                        chats += 1
                    behaviour.fail_statuses = [400]
                    refused = await client.post("/v1/chat/completions", json=_requests()[0])
                    assert refused.status_code == 400
                    chats += 1
                    malformed = await client.post(
                        "/v1/chat/completions", content=b'{"messages": "' + CANARY.encode(),
                        headers={"content-type": "application/json"})
                    assert malformed.status_code == 400
                    assert CANARY not in malformed.text

                await traffic()
                own_broker.pause()
                try:
                    await traffic()
                    spooled = _files_under(tmp_path / "spool")
                    review_spooled = _files_under(review_dir / "spool")
                finally:
                    own_broker.resume()
                await traffic()
                outcome = await client.post("/v1/outcomes", json={
                    "request_id": "unknown-request", "correct_route": False})
                assert outcome.status_code == 202

            # Every decision is on Kafka and in the audit trail, and the scorer published
            # figures covering them, before anything is read.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                found = await _all_records(own_broker.bootstrap, [
                    settings.topic(ROUTE_DECISIONS), settings.topic(ROUTE_SCORES)])
                decisions, scores = found.values()
                audit_lines = b"".join(_files_under(audit_dir).values()).count(b"\n")
                scored = max((decode_event(r.value).decisions for r in scores), default=0)
                if len(decisions) >= chats and audit_lines >= chats and scored >= chats:
                    break
                await asyncio.sleep(1)
            async with httpx.AsyncClient(timeout=10) as client:
                scraped = [(await client.get(f"http://127.0.0.1:{m}/metrics")).text
                           for m in (metrics, writer_metrics, scorer_metrics, drift_metrics)]
        finally:
            processes = [gateway] + [process for process, _, _ in consumers]
            for process in processes:
                process.send_signal(signal.SIGTERM)
            codes = [process.wait(30) for process in processes]
        # The services flushed their spans at shutdown; give the sink a moment to take them.
        deadline = time.monotonic() + 10
        while not {s for s, _ in sink.spans()} >= SERVICES and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        spans = sink.dump()
        exporters = {s for s, _ in sink.spans()}
    assert codes == [0, 0, 0, 0], log.read_text()[-3000:]
    assert spooled, "the paused broker made the gateway spool its events"

    records = await _all_records(own_broker.bootstrap, [settings.topic(t) for t in TOPICS])
    review_topic = settings.topic(PROMPTS_REVIEW)
    captured = [decode_event(r.value) for r in records[review_topic]]
    assert captured, "review capture published the redacted prompt to its own topic"
    assert any(CANARY in c.messages[0].content for c in captured)
    for topic, found in records.items():
        for record in found:
            blobs = [record.value or b"", record.key or b""] + [v for _, v in record.headers]
            assert not any(SECRET.encode() in b for b in blobs), topic
            if topic != review_topic:
                assert not any(CANARY.encode() in b for b in blobs), topic
    for path, content in spooled.items():
        assert CANARY.encode() not in content, path
    assert review_spooled, "review captures waited in their own spool"
    for path, content in {**_files_under(review_dir), **review_spooled}.items():
        assert SECRET.encode() not in content, path
    for path, content in _files_under(audit_dir).items():
        assert CANARY.encode() not in content, path
    for directory in (tmp_path / "scorer", tmp_path / "drift"):
        assert _files_under(directory), directory
        for path, content in _files_under(directory).items():
            assert CANARY.encode() not in content, path
    review = [["review", "candidates", "--dir", str(audit_dir), "--prompt-dir", str(review_dir),
               "--json-output", str(tmp_path / "candidates.json")],
              ["review", "packet", "--dir", str(audit_dir), "--prompt-dir", str(review_dir),
               "--output", str(tmp_path / "packet.json")]]
    outputs = []
    for args in review:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    outputs += [(tmp_path / name).read_text() for name in ("candidates.json", "packet.json")]
    logs = [(tmp_path / f"{name}.log").read_text() for name in ("audit-writer", "scorer",
                                                                 "drift-detector")]
    for text in (log.read_text(), *logs, *scraped, spans, *outputs):
        assert CANARY not in text
        assert SECRET not in text
    assert "routemesh.decide" in spans
    assert exporters == SERVICES, "every service's spans"
