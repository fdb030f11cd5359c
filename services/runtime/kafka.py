"""How services talk to Kafka.

Publishing, one way: ``EventProducer.publish`` encodes an event with the contracts codec
and sends it to its registered topic under its key (the request id), with the content
type and the W3C trace context in the headers, confirmed by all in-sync replicas. The
gateway's non-blocking queue and disk spool (``gateway/publisher.py``) sit on top of it.

Consuming, two ways, both decoding with the contracts codec and sending what cannot be
decoded to ``dlq.v1`` (``DeadLetters``) before moving on:

- ``runtime.consumer.EventConsumer``: batches to a handler that may hold events until
  their effect is durable; a partition's commit never passes the oldest held event. For
  every service that joins, windows or batches events (audit writer, drift detector,
  scorer, replay worker).
- ``subscribe_events`` (FastStream): one message at a time, committed once its handler
  returned; or, without a group, a broadcast every instance reads whole (the gateway's
  route-bank announcements).

``create_broker`` makes the FastStream broker ``subscribe_events`` needs; ``client_kwargs``
the connection settings every aiokafka client shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from aiokafka import AIOKafkaProducer, TopicPartition, errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import MessageSizeTooLargeError, TopicAlreadyExistsError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.kafka.security import parse_security
from faststream.security import (
    BaseSecurity,
    SASLPlaintext,
    SASLScram256,
    SASLScram512,
)
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Counter

from routemesh.contracts import (
    CONTENT_TYPE,
    TOPICS,
    DeadLetter,
    Event,
    EventDecodeError,
    Topic,
    decode_event,
    encode_event,
    topic_for_event,
)
from routemesh.contracts.topics import DLQ, STATE_TOPICS
from routemesh.services.runtime.files import write_atomically
from routemesh.services.runtime.retry import Backoff
from routemesh.services.runtime.settings import ServiceSettings

log = logging.getLogger(__name__)
ServiceSettingsT = TypeVar("ServiceSettingsT", bound=ServiceSettings)

EventHandler = Callable[[Event, KafkaMessage], Awaitable[None]]


class RetryableError(Exception):
    """The handler could not finish now (a dependency is down); redeliver the message."""


class MsgspecCodec:
    """FastStream codec: Structs become JSON via msgspec; bytes pass through untouched.

    Decoding hands the raw bytes on; ``subscribe_events`` decodes them itself so that a
    decode failure becomes a dead letter instead of an exception inside FastStream.
    """

    _encoder = msgspec.json.Encoder()

    async def decode(self, msg: Any) -> bytes:
        body: bytes = msg.body
        return body

    async def encode(self, msg: Any, serializer: Any = None) -> tuple[bytes, str | None]:
        if isinstance(msg, bytes):
            return msg, None
        return self._encoder.encode(msg), CONTENT_TYPE


def _security(settings: ServiceSettings) -> BaseSecurity | None:
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    ssl_context = None
    if protocol in ("SSL", "SASL_SSL"):
        ssl_context = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
        if settings.kafka_ssl_certfile:
            ssl_context.load_cert_chain(
                str(settings.kafka_ssl_certfile),
                str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
            )
    if protocol == "SSL":
        return BaseSecurity(ssl_context=ssl_context, use_ssl=True)
    if settings.kafka_sasl_username is None or settings.kafka_sasl_password is None:
        raise ValueError(
            f"ROUTEMESH_KAFKA_SECURITY_PROTOCOL={protocol} needs "
            "ROUTEMESH_KAFKA_SASL_USERNAME and ROUTEMESH_KAFKA_SASL_PASSWORD"
        )
    sasl = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}
    return sasl[settings.kafka_sasl_mechanism](
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password.get_secret_value(),
        ssl_context=ssl_context,
        use_ssl=protocol == "SASL_SSL",
    )


def client_kwargs(settings: ServiceSettings) -> dict[str, Any]:
    """Connection settings for a plain aiokafka client, with the same security as the
    broker factory (for consumers that manage offsets themselves)."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        **parse_security(_security(settings)),
    }


def delivery_options(settings: ServiceSettings) -> dict[str, Any]:
    """How every producer of the mesh delivers: confirmed by all in-sync replicas,
    idempotent where the broker allows, compressed, batched for ``kafka_linger_ms``."""
    return {
        "acks": "all",
        "enable_idempotence": settings.kafka_idempotent_producer,
        "compression_type": settings.kafka_compression,
        "linger_ms": settings.kafka_linger_ms,
        "max_batch_size": settings.kafka_max_batch_bytes,
    }


Publish = Callable[[Event], Awaitable[None]]


class EventProducer:
    """The one way a service publishes events (see the module's docstring).

    A plain aiokafka producer rather than FastStream's: FastStream's per-message publish
    middlewares (a span and Prometheus series each) took a third of the gateway's event
    loop under load (bench/gateway.py)."""

    def __init__(
        self,
        settings: ServiceSettings,
        service: str,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        self.tracer = trace.get_tracer(f"routemesh.{service}", tracer_provider=tracer_provider)
        self._producer = AIOKafkaProducer(
            **client_kwargs(settings), client_id=f"routemesh-{service}",
            **delivery_options(settings),
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        """Flushes what was sent, then closes."""
        await self._producer.stop()

    async def publish(self, event: Event, context: Context | None = None,
                      address: Address | None = None) -> None:
        """Returns once the broker confirmed the event; raises if it did not. The publish
        span (and so the traceparent header) continues ``context``, by default the
        current one. ``address`` is the event's, when the caller has it already."""
        topic, key = address or event_address(self.settings, event)
        with self.tracer.start_as_current_span(
            f"{topic} publish", context=context, kind=trace.SpanKind.PRODUCER,
            attributes={"messaging.system": "kafka", "messaging.destination.name": topic},
        ):
            delivery = await self._producer.send(
                topic, encode_event(event), key=key, headers=_headers())
            await delivery

    async def publish_all(self, events: Sequence[Event]) -> None:
        """Returns once the broker confirmed every event of ``events`` (the re-keyed
        copies of a batch); raises if it did not. One span for the lot, named by the
        first event's topic: a span and a coroutine per event were most of a
        repartition's cost (bench/scale_out.py --service drift-detector)."""
        if not events:
            return
        topic = event_address(self.settings, events[0])[0]
        with self.tracer.start_as_current_span(
            f"{topic} publish", kind=trace.SpanKind.PRODUCER,
            attributes={"messaging.system": "kafka", "messaging.destination.name": topic,
                        "messaging.batch.message_count": len(events)},
        ):
            headers = _headers()
            deliveries = []
            for event in events:
                topic, key = event_address(self.settings, event)
                deliveries.append(await self._producer.send(
                    topic, encode_event(event), key=key, headers=headers))
            await asyncio.gather(*deliveries)


def _headers() -> list[tuple[str, bytes]]:
    """An event's headers: its content type and the current span's trace context."""
    headers = {"content-type": CONTENT_TYPE}
    propagate.inject(headers)
    return [(k, v.encode()) for k, v in headers.items()]


async def answers_metadata(**client: Any) -> bool:
    """Whether a Kafka bootstrap server (``client``: aiokafka's connection arguments)
    answers a metadata request."""
    admin = AIOKafkaAdminClient(**client, request_timeout_ms=2000)
    # Refused connections are expected while a broker boots; aiokafka logs each one as an
    # error, which would read like a failure.
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        await admin.start()
        await admin.list_topics()
        return True
    except Exception:
        return False
    finally:
        await admin.close()
        client_log.setLevel(level)


async def until_reachable(settings: ServiceSettings, stop: asyncio.Event) -> bool:
    """Wait, with backoff, until Kafka answers (True) or ``stop`` is set (False): a
    service started before its broker (a pod before Kafka's, a process beside `routemesh
    dev` starting its broker) waits for it instead of exiting on the first refusal."""
    if await answers_metadata(**client_kwargs(settings)):
        return True
    log.warning("Kafka does not answer yet; waiting for it",
                extra={"bootstrap_servers": settings.kafka_bootstrap_servers})
    delays = Backoff(0.2, 5.0).delays()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), next(delays))
        if not stop.is_set() and await answers_metadata(**client_kwargs(settings)):
            return True
    return False


async def idempotence_refused(settings: ServiceSettings) -> bool:
    """Whether the broker refuses an idempotent producer (InitProducerId): the embedded
    broker does, with an error that names nothing. Asked once, before any producer of the
    service starts, so that a service can fall back with one clear warning."""
    probe = AIOKafkaProducer(**client_kwargs(settings), enable_idempotence=True)
    # aiokafka logs the refusal as an error of its own; the caller says what it means.
    sender = logging.getLogger("aiokafka.producer.sender")
    level = sender.level
    sender.setLevel(logging.CRITICAL)
    try:
        await probe.start()
    except errors.UnknownError:
        return True
    finally:
        sender.setLevel(level)
        await probe.stop()
    return False


async def without_refused_idempotence(settings: ServiceSettingsT) -> ServiceSettingsT:
    """``settings``, with idempotence off (and one warning) when the broker refuses it."""
    if settings.kafka_idempotent_producer and await idempotence_refused(settings):
        log.warning("the broker refuses idempotent producers (the embedded broker does): "
                    "publishing without idempotence; set "
                    "ROUTEMESH_KAFKA_IDEMPOTENT_PRODUCER=false to say so and skip this check")
        return settings.model_copy(update={"kafka_idempotent_producer": False})
    return settings


def create_broker(
    settings: ServiceSettings,
    *,
    service: str,
    tracer_provider: TracerProvider | None = None,
) -> KafkaBroker:
    return KafkaBroker(
        settings.kafka_bootstrap_servers,
        security=_security(settings),
        client_id=f"routemesh-{service}",
        codec=MsgspecCodec(),
        serializer=None,
        **delivery_options(settings),
        graceful_timeout=settings.shutdown_timeout_s,
        # Trace context through the headers; its Prometheus middleware is left out: the
        # consumer runtime and the producer count what the mesh's metrics document.
        middlewares=(KafkaTelemetryMiddleware(tracer_provider=tracer_provider),),
        logger=logging.getLogger(f"routemesh.{service}.kafka"),
    )


# The topic name (with the configured prefix) and the key an event is published under.
Address = tuple[str, bytes | None]


def event_address(settings: ServiceSettings, event: Event) -> Address:
    """The topic name (with the configured prefix) and the key an event is published under."""
    topic = topic_for_event(type(event))
    return settings.topic(topic), topic.key_for(event)


# A dead letter keeps the whole original; of the error that sent it there, this much.
DEAD_LETTER_ERROR_CHARS = 4000


class DeadLetters:
    """Builds and publishes dead letters, counted by source topic and error kind.

    A dead letter keeps its original whole, so an original larger than a Kafka message
    may be (the one that would never be published, and so never committed past) is
    written whole to ``dead_letter_dir`` as ``<sha256>.bin`` first; the event carries its
    first bytes, its size and its sha256."""

    def __init__(
        self,
        publish: Publish,
        service: str,
        registry: CollectorRegistry,
        *,
        spill_dir: Path = Path("dead-letters"),
        max_bytes: int = 256 * 1024,
    ) -> None:
        self._publish = publish
        self._service = service
        self.spill_dir = spill_dir
        self.max_bytes = max_bytes
        self._counter = Counter(
            "routemesh_dlq_messages_total",
            "Messages sent to the dead-letter topic",
            ["service", "source_topic", "kind"],
            registry=registry,
        )
        self._spilled = Counter(
            "routemesh_dlq_spilled_total",
            "Dead letters whose original was too large for the topic, stored on local disk",
            ["service"], registry=registry,
        )

    def letter(
        self,
        original: bytes,
        *,
        source_topic: str,
        partition: int,
        offset: int,
        kind: str,
        error: str,
        headers: tuple[tuple[str, bytes], ...] = (),
        key: bytes | None = None,
        group: str | None = None,
        max_bytes: int | None = None,
    ) -> DeadLetter:
        """The dead letter of ``original``; one too large is stored on disk first."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        whole = len(original) <= limit
        digest = None if whole else self._spill(original)
        return DeadLetter(
            original=original if whole else original[:limit],
            headers=headers,
            key=key,
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            consumer_group=group,
            service=self._service,
            error_kind=kind,
            error=error[:DEAD_LETTER_ERROR_CHARS],
            original_size=len(original),
            original_sha256=digest,
            truncated=not whole,
        )

    def _spill(self, original: bytes) -> str:
        digest = hashlib.sha256(original).hexdigest()
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        target = self.spill_dir / f"{digest}.bin"
        if not target.exists():
            write_atomically(target, original)
        self._spilled.labels(self._service).inc()
        log.warning("a dead letter's original is too large for the topic; stored whole",
                    extra={"original_sha256": digest, "original_size": len(original)})
        return digest

    async def send(self, record: Any, group: str | None, kind: str, error: str) -> None:
        """Publish a dead letter for ``record`` (an aiokafka ConsumerRecord). Should the
        broker still refuse it as too large (its limit below ours), the original is cut
        shorter until it fits."""
        limit = self.max_bytes
        while True:
            letter = self.letter(
                bytes(record.value or b""),
                headers=tuple((k, bytes(v)) for k, v in (record.headers or ())),
                key=record.key, source_topic=record.topic, partition=record.partition,
                offset=record.offset, group=group, kind=kind, error=error, max_bytes=limit,
            )
            try:
                await self._publish(letter)
            except MessageSizeTooLargeError:
                if limit <= 64:
                    raise
                limit = max(limit // 4, 64)
                continue
            break
        self._counter.labels(self._service, record.topic, kind).inc()
        log.warning(
            "dead-lettered a message",
            extra={
                "source_topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "error_kind": kind,
            },
        )


def subscribe_events(
    broker: KafkaBroker,
    settings: ServiceSettings,
    topics: Collection[Topic],
    *,
    group_id: str | None,
    handler: EventHandler,
    dead_letters: DeadLetters,
    retry_backoff_s: float = 1.0,
) -> None:
    """Consume ``topics`` as ``group_id``; commit each offset only after ``handler`` succeeds.

    Undecodable bytes, event types the topics do not carry, and handler errors other
    than ``RetryableError`` go to the DLQ and are then committed, so one bad message
    never blocks a partition. A ``RetryableError`` rewinds to the message and retries it.

    ``group_id=None`` is a broadcast: every instance reads every partition from the
    start and commits nothing, so ``handler`` must be idempotent. For what each instance
    of a service must see (a new route bank) without leaving a consumer group behind at
    every restart, each with committed offsets and a lag that grows forever.
    """
    accepted = frozenset(e for topic in topics for e in topic.events)
    names = [settings.topic(t) for t in topics]

    @broker.subscriber(
        *names,
        group_id=group_id,
        # Without a group there is nothing to commit: FastStream's "ack first" is the
        # policy that never calls commit.
        ack_policy=AckPolicy.MANUAL if group_id else AckPolicy.ACK_FIRST,
        auto_offset_reset="earliest",
    )
    async def _consume(msg: KafkaMessage) -> None:
        try:
            event = decode_event(msg.body, accepted)
        except EventDecodeError as exc:
            await _dead_letter(msg, exc.kind, str(exc))
            return
        try:
            await handler(event, msg)
        except RetryableError as exc:
            log.warning("retrying a message later", extra={"error": str(exc)})
            await _rewind(msg)
            return
        except Exception as exc:
            log.exception("handler failed; dead-lettering the message")
            await _dead_letter(msg, "handler_error", f"{type(exc).__name__}: {exc}")
            return
        await msg.ack()

    async def _dead_letter(msg: KafkaMessage, kind: str, error: str) -> None:
        try:
            await dead_letters.send(msg.raw_message, group_id, kind, error)
        except Exception:
            # Committing past a message whose dead letter was not written would lose it.
            log.exception("could not publish a dead letter; will retry the message")
            await _rewind(msg)
            return
        await msg.ack()

    async def _rewind(msg: KafkaMessage) -> None:
        if group_id:
            await msg.nack()
        else:
            # A broadcast message has no commit to hold back: move the reader back.
            record: Any = msg.raw_message
            msg.consumer.seek(TopicPartition(record.topic, record.partition), record.offset)
        await asyncio.sleep(retry_backoff_s)


class TopicsRefused(Exception):
    """The broker refused to create topics; the message names each and why."""


def refusals(topic_errors: Iterable[tuple[Any, ...]]) -> list[str]:
    """What a CreateTopics response refused, one "topic: error (message)" each. The
    admin client returns per-topic errors instead of raising; a topic another process
    created meanwhile is no refusal."""
    refused = []
    for topic, code, *message in topic_errors:
        error = errors.for_code(code)
        if error is errors.NoError or error is TopicAlreadyExistsError:
            continue
        said = message[0] if message and message[0] else error.description
        refused.append(f"{topic}: {error.__name__} ({said})")
    return refused


async def create_topics(
    settings: ServiceSettings, *, replication_factor: int = 1, timeout_s: float = 30.0
) -> list[str]:
    """Create every registered topic that does not exist yet; return the ones created.
    Raises TopicsRefused naming every topic the broker refused and why."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings), request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(settings.topic(t), t.partitions, replication_factor,
                     topic_configs={"cleanup.policy": "compact"} if t.compacted else {})
            for t in (*TOPICS, *STATE_TOPICS)
            if settings.topic(t) not in existing
        ]
        if missing:
            response = await admin.create_topics(missing)
            refused = refusals(response.topic_errors)
            if refused:
                raise TopicsRefused("; ".join(refused))
        return [t.name for t in missing]
    finally:
        await admin.close()


async def short_topics(settings: ServiceSettings, timeout_s: float = 30.0
                       ) -> list[tuple[str, int, int]]:
    """(name, partitions it has, partitions the registry gives it) of every existing
    topic with fewer partitions than the registry's: made by an older release or by
    hand, it caps the instances of its consumers that get any work."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings), request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        wanted = {settings.topic(t): t.partitions for t in (*TOPICS, *STATE_TOPICS)}
        described = await admin.describe_topics(list(wanted))
    finally:
        await admin.close()
    return sorted((d["topic"], len(d["partitions"]), wanted[d["topic"]]) for d in described
                  if d["topic"] in wanted and d["partitions"]
                  and len(d["partitions"]) < wanted[d["topic"]])


__all__ = [
    "DLQ",
    "Address",
    "DeadLetters",
    "EventProducer",
    "MsgspecCodec",
    "RetryableError",
    "TopicsRefused",
    "client_kwargs",
    "create_broker",
    "create_topics",
    "delivery_options",
    "event_address",
    "refusals",
    "short_topics",
    "subscribe_events",
]
