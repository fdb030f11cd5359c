"""W3C trace context travels in Kafka headers: a consumer continues the producer's trace."""

import asyncio

import pytest
from faststream.kafka import KafkaMessage
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from routemesh.contracts import RouteDecided
from routemesh.contracts.topics import ROUTE_DECISIONS
from routemesh.services.runtime.kafka import (
    DeadLetters,
    create_broker,
    subscribe_events,
)
from tests.services.runtime.helpers import broker_publish

pytestmark = pytest.mark.broker


async def test_the_consumer_continues_the_producers_trace(settings):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    broker = create_broker(settings, service="trace", tracer_provider=provider)
    received: list[tuple[dict, int]] = []
    done = asyncio.Event()

    async def handler(event, msg: KafkaMessage):
        span = trace.get_current_span().get_span_context()
        received.append((dict(msg.headers), span.trace_id))
        done.set()

    subscribe_events(broker, settings, [ROUTE_DECISIONS], group_id="trace", handler=handler,
                     dead_letters=DeadLetters(broker_publish(broker, settings), "trace", registry))
    async with broker:
        await broker.start()
        with provider.get_tracer("test").start_as_current_span("request") as root:
            await broker_publish(broker, settings)(RouteDecided(
                request_id="traced", route_id="lite", target_model="m", reason="rule",
                layer="rules"))
        await asyncio.wait_for(done.wait(), 60)

    (headers, consumer_trace_id), = received
    trace_id = root.get_span_context().trace_id
    assert headers["traceparent"].split("-")[1] == format(trace_id, "032x")
    assert headers["content-type"] == "application/json"
    assert consumer_trace_id == trace_id
