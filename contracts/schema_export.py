"""JSON Schema per event and an AsyncAPI 3.0 document, generated from the structs.

FastStream's AsyncAPI generator reads pydantic models, not msgspec Structs, so the
document is built here from the topic registry. Output is deterministic (sorted, no
timestamps) so that CI can diff it against the checked-in copy. Nothing here touches a
file: ``routemesh contracts export`` and ``check`` write and compare them.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import msgspec
import yaml

from routemesh.contracts.codec import CONTENT_TYPE, event_tag
from routemesh.contracts.events import EVENT_TYPES, Event
from routemesh.contracts.topics import DEFAULT_PREFIX, TOPICS, Topic

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _name(event_type: type[Event]) -> str:
    return event_tag(event_type)


def _normalised(node: Any) -> Any:
    """``node`` with every ``description`` put through ``inspect.cleandoc``.

    msgspec copies a struct's docstring into ``description``, and how it strips the
    docstring's indentation changed between releases (0.22 kept it, 0.23 does not): the
    checked-in schemas must compare meaning, not a library's whitespace.
    """
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else _normalised(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_normalised(item) for item in node]
    return node


def event_schema(event_type: type[Event]) -> dict[str, Any]:
    """A standalone JSON Schema for one event, its nested structs under ``$defs``."""
    (ref,), components = msgspec.json.schema_components(
        [event_type], ref_template="#/$defs/{name}"
    )
    name = ref["$ref"].rsplit("/", 1)[1]
    schema: dict[str, Any] = {"$schema": SCHEMA_DIALECT, "$id": f"{_name(event_type)}.json"}
    schema.update(components.pop(name))
    if components:
        schema["$defs"] = dict(sorted(components.items()))
    normalised: dict[str, Any] = _normalised(schema)
    return normalised


def _channel_id(topic: Topic) -> str:
    return topic.suffix.replace(".", "_")


def asyncapi_document(prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        EVENT_TYPES, ref_template="#/components/schemas/{name}"
    )
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for topic in TOPICS:
        channel_id = _channel_id(topic)
        channel_messages = {}
        for event_type in topic.events:
            name = _name(event_type)
            messages[name] = {
                "name": name,
                "title": name,
                "summary": (event_type.__doc__ or name).strip().splitlines()[0],
                "contentType": CONTENT_TYPE,
                "payload": {"$ref": f"#/components/schemas/{name}"},
                "correlationId": {"location": "$message.payload#/event_id"},
            }
            if topic.key_field:
                messages[name]["bindings"] = {
                    "kafka": {"key": {"type": "string", "description": topic.key_field}}
                }
            channel_messages[name] = {"$ref": f"#/components/messages/{name}"}
        channels[channel_id] = {
            "address": topic.name(prefix),
            "description": topic.description,
            "messages": channel_messages,
            "bindings": {"kafka": {"topic": topic.name(prefix), "partitions": topic.partitions}},
        }
        operations[f"receive_{channel_id}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "messages": [
                {"$ref": f"#/channels/{channel_id}/messages/{_name(e)}"} for e in topic.events
            ],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "routemesh",
            "version": "1.0.0",
            "description": "Events published by routemesh. JSON, keyed by request_id where "
            "the event has one, W3C trace context in the message headers.",
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "kafka": {"host": "localhost:9092", "protocol": "kafka", "description": "embedded"}
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": _normalised(dict(sorted(components.items()))),
        },
    }


def render() -> dict[str, str]:
    """File name to file content, for every generated file."""
    files = {
        f"{_name(event_type)}.json": json.dumps(event_schema(event_type), indent=2) + "\n"
        for event_type in EVENT_TYPES
    }
    files["asyncapi.yaml"] = yaml.safe_dump(
        asyncapi_document(), sort_keys=False, width=100, allow_unicode=True
    )
    return files
