"""A third-party consumer of routemesh's route decisions.

It needs only aiokafka and jsonschema and the checked-in JSON Schema; it does not import
routemesh, which is the point: any team, in any language, can do the same.

    python examples/downstream_consumer.py --bootstrap 127.0.0.1:9092 --group my-team

What the topic promises: exactly one RouteDecided per request (``request_id``, the
mesh's own id; ``client_request_id`` is the caller's ``x-request-id``, which two requests
may share), keyed by request id, metadata only. Decisions a shadow (candidate) config
made are not on it: they are ShadowDecided events on ``route.shadow_decisions.v1``.
Minor versions only add fields, so a consumer ignores fields it does not know (the
schema allows them). A 1.2 producer could mark a shadow decision with ``shadow: true`` on
this topic; such a decision was never served and is skipped here.

Each valid RouteDecided is printed as one JSON line; an invalid one is reported on
stderr and skipped. Offsets are committed after each batch is handled (at-least-once),
so a real consumer should deduplicate on ``event_id``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path

import jsonschema
from aiokafka import AIOKafkaConsumer

DEFAULT_SCHEMA = Path(__file__).resolve().parent.parent / "contracts/schemas/RouteDecided.json"


async def consume(args: argparse.Namespace, validator: jsonschema.Validator) -> int:
    consumer = AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if args.from_beginning else "latest",
    )
    await consumer.start()
    seen: set[str] = set()
    handled = 0
    try:
        while args.max is None or handled < args.max:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    try:
                        event = json.loads(record.value)
                        validator.validate(event)
                    except (ValueError, jsonschema.ValidationError) as exc:
                        print(f"skipping offset {record.offset}: {exc}", file=sys.stderr)
                        continue
                    if event["event_id"] in seen or event.get("shadow"):
                        continue
                    seen.add(event["event_id"])
                    print(json.dumps(event), flush=True)
                    handled += 1
            if batch:
                await consumer.commit()
    finally:
        await consumer.stop()
    return handled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="routemesh.route.decisions.v1")
    parser.add_argument("--group", default="example-downstream")
    parser.add_argument("--schema", default=str(DEFAULT_SCHEMA))
    parser.add_argument("--from-beginning", action="store_true")
    parser.add_argument("--max", type=int, default=None, help="stop after this many events")
    args = parser.parse_args()
    validator = jsonschema.Draft202012Validator(json.loads(Path(args.schema).read_text()))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(consume(args, validator))


if __name__ == "__main__":
    main()
