"""JSON wire format: encode any event; decode by the envelope (``type``, ``schema_version``).

The envelope decides: ``type`` picks the struct, the major of ``schema_version`` must be one
this consumer reads, so an unknown type or a newer major is named as such and a consumer
can send it to the DLQ and move on, instead of failing on an opaque validation error.

msgspec's tagged union already reads the ``type`` tag before it decodes the body, so the
happy path is one pass over the bytes; the separate envelope decode runs only when that
pass fails, to say why. Decoding the envelope up front as well costs a second full scan
of the document on every event (bench/contracts.py).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Union

import msgspec

from routemesh.contracts.events import EVENT_TYPES, Event

CONTENT_TYPE = "application/json"


class Envelope(msgspec.Struct, frozen=True):
    type: str
    schema_version: str


class EventDecodeError(ValueError):
    """Why bytes could not become an event. ``kind`` is a short, stable code."""

    def __init__(self, kind: str, message: str, event_type: str | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.event_type = event_type


def _major(version: str) -> int:
    major, _, _ = version.partition(".")
    return int(major)


def _default_version(event_type: type[Event]) -> str:
    for field in msgspec.structs.fields(event_type):
        if field.name == "schema_version" and isinstance(field.default, str):
            return field.default
    raise TypeError(f"{event_type.__name__} has no schema_version")


def event_tag(event_type: type[Event]) -> str:
    """The ``type`` an event is tagged with (its class name)."""
    tag = event_type.__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"{event_type.__name__} has no string tag")
    return tag


_BY_TAG: dict[str, type[Event]] = {event_tag(cls): cls for cls in EVENT_TYPES}
_MAJOR: dict[str, int] = {tag: _major(_default_version(cls)) for tag, cls in _BY_TAG.items()}
_MAJOR_PREFIX: dict[type[Event], str] = {cls: f"{_MAJOR[tag]}." for tag, cls in _BY_TAG.items()}
_ENVELOPE = msgspec.json.Decoder(Envelope)
_ANY_EVENT = msgspec.json.Decoder(Union[EVENT_TYPES])  # noqa: UP007 (a runtime tuple)
_ENCODER = msgspec.json.Encoder()


def encode_event(event: Event) -> bytes:
    return _ENCODER.encode(event)


def decode_event(data: bytes, accept: Collection[type[Event]] | None = None) -> Event:
    """Decode one event; raise EventDecodeError with the reason when it cannot.

    ``accept`` limits the types a caller takes (a topic's registered events): anything
    else is reported as ``unexpected_type``.
    """
    try:
        event: Event = _ANY_EVENT.decode(data)
    except msgspec.DecodeError as exc:
        raise _classify(data, exc) from None
    event_type = type(event)
    if not event.schema_version.startswith(_MAJOR_PREFIX[event_type]):
        tag = event_tag(event_type)
        raise _check_version(tag, event.schema_version) or EventDecodeError(
            "invalid_version", f"schema_version {event.schema_version!r} is not MAJOR.MINOR", tag
        )
    if accept is not None and event_type not in accept:
        tag = event_tag(event_type)
        raise EventDecodeError("unexpected_type", f"{tag} is not accepted here", tag)
    return event


def _check_version(tag: str, version: str) -> EventDecodeError | None:
    try:
        major = _major(version)
    except ValueError:
        return EventDecodeError(
            "invalid_version", f"schema_version {version!r} is not MAJOR.MINOR", tag
        )
    if major != _MAJOR[tag]:
        return EventDecodeError(
            "unsupported_version",
            f"{tag} schema_version {version} (this consumer reads {_MAJOR[tag]}.x)",
            tag,
        )
    return None


def _classify(data: bytes, body_error: msgspec.DecodeError) -> EventDecodeError:
    """Say why bytes did not decode, reading the envelope alone."""
    try:
        envelope = _ENVELOPE.decode(data)
    except msgspec.ValidationError as exc:
        return EventDecodeError("invalid_envelope", str(exc))
    except msgspec.DecodeError as exc:
        return EventDecodeError("invalid_json", str(exc))
    tag = envelope.type
    if tag not in _BY_TAG:
        return EventDecodeError("unknown_type", f"unknown event type {tag!r}", tag)
    version_error = _check_version(tag, envelope.schema_version)
    if version_error is not None:
        return version_error
    return EventDecodeError("invalid_event", f"{tag}: {body_error}", tag)
