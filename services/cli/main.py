"""The ``routemesh`` command."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
import uvloop
from aiokafka.errors import KafkaConnectionError

from routemesh.contracts import topic_by_suffix
from routemesh.services.cli import (
    audit_commands,
    drift_commands,
    learn_commands,
    replay_commands,
    router_commands,
    scorer_commands,
)
from routemesh.services.cli.contracts_commands import contracts_app
from routemesh.services.cli.dev import DevMesh, parse_port_overrides, parse_replicas
from routemesh.services.cli.output import fail
from routemesh.services.cli.tail import tail_topic
from routemesh.services.runtime.consumer import TopicNotFound
from routemesh.services.runtime.embedded_broker import EmbeddedBroker, EmbeddedBrokerError
from routemesh.services.runtime.kafka import TopicsRefused, create_topics, short_topics
from routemesh.services.runtime.service import discover_services, run
from routemesh.services.runtime.settings import ServiceSettings

app = typer.Typer(
    help="routemesh: route LLM requests between model tiers and explain every decision.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
topics_app = typer.Typer(help="Kafka topics of the registry.", no_args_is_help=True)
app.add_typer(contracts_app, name="contracts")
app.add_typer(topics_app, name="topics")
app.add_typer(router_commands.bank_app, name="bank")
app.add_typer(router_commands.encoder_app, name="encoder")
app.add_typer(audit_commands.audit_app, name="audit")
app.add_typer(drift_commands.drift_app, name="drift")
app.command("route")(router_commands.route)
app.command("eval")(router_commands.eval_command)
app.add_typer(scorer_commands.review_app, name="review")
app.add_typer(scorer_commands.scores_app, name="scores")
app.command("tune")(scorer_commands.tune_command)
app.add_typer(replay_commands.replay_app, name="replay")
app.add_typer(replay_commands.samples_app, name="samples")
app.command("gate")(replay_commands.gate)
app.add_typer(learn_commands.learn_app, name="learn")



def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM, without a KeyboardInterrupt traceback."""
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not received:
            time.sleep(0.2)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="Port to listen on (loopback).")] = 9092,
    topic_prefix: Annotated[str | None, typer.Option(help="Topic name prefix.")] = None,
) -> None:
    """Run the embedded Kafka-compatible broker (Tansu, memory-only) with every topic."""
    embedded = EmbeddedBroker(port, topic_prefix=topic_prefix)
    try:
        created = embedded.start()
    except EmbeddedBrokerError as exc:
        raise fail(str(exc)) from None
    print(f"kafka  {embedded.bootstrap}  ({len(created)} topics created)", flush=True)
    try:
        _wait_for_signal()
    finally:
        embedded.stop()


@app.command()
def serve(service: Annotated[str, typer.Argument(help="The service to run.")]) -> None:
    """Run one service against the configured Kafka (what a container runs)."""
    specs = discover_services()
    if service not in specs:
        known = ", ".join(specs) or "none installed"
        raise fail(f"unknown service {service!r}; available: {known}")
    # uvloop (a dependency through uvicorn[standard]) keeps the event loop's own cost
    # off the gateway's request path; every service runs on it alike.
    uvloop.run(run(specs[service]))


@app.command()
def dev(
    config: Annotated[
        Path | None, typer.Option(help="Route config (YAML) for the gateway.", exists=True)
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="Where state and logs go.")] = Path(
        ".routemesh"
    ),
    kafka_port: Annotated[int, typer.Option(help="Embedded broker port.")] = 9092,
    port: Annotated[
        list[str] | None,
        typer.Option(help="Move one of a service's ports: SERVICE.PORT=NUMBER, e.g. "
                          "gateway.http=8081 or audit-writer.metrics=9202 (repeatable)."),
    ] = None,
    replicas: Annotated[
        list[str] | None,
        typer.Option(help="Run more instances of a service in its consumer group: "
                          "SERVICE=N, e.g. audit-writer=2 (repeatable). Instance n listens "
                          "on each port + 100 x (n - 1)."),
    ] = None,
) -> None:
    """Run the whole mesh locally: embedded broker, Qdrant local mode, every service."""
    specs = discover_services()
    try:
        overrides = parse_port_overrides(port or [], specs)
        counts = parse_replicas(replicas or [], specs)
    except ValueError as exc:
        raise fail(str(exc), 2) from None
    mesh = DevMesh(
        data_dir=data_dir.resolve(),
        config=config.resolve() if config else None,
        kafka_port=kafka_port,
        port_overrides=overrides,
        specs=specs,
        replicas=counts,
        say=lambda line: print(line, flush=True),
    )
    try:
        for name, address in mesh.start():
            print(f"{name}  {address}", flush=True)
    except (EmbeddedBrokerError, ValueError, RuntimeError) as exc:
        mesh.stop()
        raise fail(str(exc)) from None
    print("routemesh dev is running; Ctrl-C stops everything.", flush=True)
    try:
        failed = mesh.wait()
    finally:
        mesh.stop()
    if failed:
        raise fail(failed)


@app.command()
def tail(
    topic: Annotated[str, typer.Argument(help="Topic, e.g. route.decisions.v1 (prefix optional).")],
    from_beginning: Annotated[bool, typer.Option(help="Start at the oldest event.")] = False,
    max: Annotated[int | None, typer.Option(help="Stop after this many events.")] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Stop after this many seconds without an event.")
    ] = None,
    raw: Annotated[bool, typer.Option(
        help="Print every value as it came, events or not (default: undecodable values "
             "go to stderr, so stdout is JSON lines only).")] = False,
) -> None:
    """Print a topic's events as JSON lines: the simplest downstream consumer."""
    settings = ServiceSettings()
    suffix = topic.removeprefix(settings.topic_prefix)
    try:
        name = settings.topic(topic_by_suffix(suffix))
    except LookupError as exc:
        raise fail(str(exc), 2) from None
    try:
        asyncio.run(
            tail_topic(settings, name, from_beginning=from_beginning, limit=max, idle_s=timeout,
                       raw=raw)
        )
    except KeyboardInterrupt:
        pass
    except TopicNotFound as exc:
        raise fail(str(exc)) from None
    except KafkaConnectionError:
        raise fail(
            f"cannot reach Kafka at {settings.kafka_bootstrap_servers} "
            "(set ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS)"
        ) from None


@topics_app.command("create")
def topics_create(
    replication_factor: Annotated[int, typer.Option(help="Replicas per partition.")] = 3,
) -> None:
    """Create every registered topic that is missing on the configured Kafka."""
    settings = ServiceSettings()
    try:
        created = asyncio.run(create_topics(settings, replication_factor=replication_factor))
    except KafkaConnectionError:
        raise fail(f"cannot reach Kafka at {settings.kafka_bootstrap_servers}") from None
    except TopicsRefused as exc:
        raise fail(f"the broker refused to create topics: {exc}") from None
    for name in created:
        print(f"created {name}")
    print(f"{len(created)} topics created")
    for name, have, want in asyncio.run(short_topics(settings)):
        # Kafka can add partitions but not take a key's events back to its old one: a
        # request-keyed topic grown under traffic splits requests across instances.
        print(f"{name} has {have} partitions, fewer than the {want} this release makes: "
              f"no more than {have} instances of its consumers get work (add partitions "
              "with your Kafka tools; a request-keyed topic only while nothing is "
              "produced)", file=sys.stderr)


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
