import inspect
import json
import uuid
from datetime import UTC, datetime

import msgspec
import pytest

from routemesh.contracts import (
    EVENT_TYPES,
    DeadLetter,
    EventDecodeError,
    LayerAttempt,
    OutcomeReported,
    RouteDecided,
    decode_event,
    encode_event,
)


def decision(**overrides) -> RouteDecided:
    fields = dict(
        request_id="req-1",
        route_id="lite",
        target_model="small-model",
        reason="semantic",
        layer="semantic",
        attempts=(LayerAttempt(layer="semantic", selected_route="lite", decided=True),),
        prompt_sha256="a" * 64,
    )
    fields.update(overrides)
    return RouteDecided(**fields)


def test_round_trip_keeps_every_field():
    event = decision()
    assert decode_event(encode_event(event)) == event


def test_envelope_fields_are_set_by_default():
    event = decision()
    assert event.schema_version == "1.3"
    assert isinstance(event.event_id, uuid.UUID)
    assert event.occurred_at.tzinfo is not None
    body = json.loads(encode_event(event))
    assert body["type"] == "RouteDecided"
    assert list(body)[:2] == ["type", "schema_version"]


def test_events_are_frozen_and_keyword_only():
    event = decision()
    with pytest.raises(AttributeError):
        event.route_id = "deep"
    with pytest.raises(TypeError):
        RouteDecided("req-1", "lite")


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_is_frozen_kw_only_and_tagged(event_type):
    config = event_type.__struct_config__
    assert config.frozen
    parameters = inspect.signature(event_type).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)
    assert config.tag_field == "type"
    assert config.tag == event_type.__name__


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"\xff\xfe garbage", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2]", "invalid_envelope"),
        (b'{"schema_version": "1.0"}', "invalid_envelope"),
        (b'{"type": "SomethingElse", "schema_version": "1.0"}', "unknown_type"),
        (b'{"type": "RouteDecided", "schema_version": "2.0", "x": 1}', "unsupported_version"),
        (b'{"type": "RouteDecided", "schema_version": "one"}', "invalid_version"),
    ],
)
def test_undecodable_bytes_raise_one_typed_error_with_the_reason(data, kind):
    with pytest.raises(EventDecodeError) as info:
        decode_event(data)
    assert info.value.kind == kind
    assert info.value.message


def test_wrong_field_type_names_the_field():
    body = json.loads(encode_event(decision()))
    body["prompt_chars"] = "many"
    with pytest.raises(EventDecodeError) as info:
        decode_event(json.dumps(body).encode())
    assert info.value.kind == "invalid_event"
    assert "prompt_chars" in str(info.value)


def test_a_newer_major_version_is_refused_even_if_its_fields_fit():
    body = json.loads(encode_event(decision()))
    body["schema_version"] = "2.0"
    with pytest.raises(EventDecodeError) as info:
        decode_event(json.dumps(body).encode())
    assert info.value.kind == "unsupported_version"


def test_a_newer_minor_version_with_unknown_fields_decodes():
    original = decision()
    body = json.loads(encode_event(original))
    body["schema_version"] = "1.7"
    body["a_field_from_the_future"] = {"nested": [1, 2, 3]}
    event = decode_event(json.dumps(body).encode())
    assert isinstance(event, RouteDecided)
    assert event.schema_version == "1.7"
    assert msgspec.structs.replace(event, schema_version=original.schema_version) == original


def test_accept_limits_the_types_a_consumer_takes():
    data = encode_event(decision())
    assert decode_event(data, {RouteDecided}).request_id == "req-1"
    with pytest.raises(EventDecodeError) as info:
        decode_event(data, {OutcomeReported})
    assert info.value.kind == "unexpected_type"


def test_naive_timestamps_are_rejected():
    body = json.loads(encode_event(decision()))
    body["occurred_at"] = datetime(2026, 1, 1).isoformat()
    with pytest.raises(EventDecodeError, match="occurred_at"):
        decode_event(json.dumps(body).encode())


def test_dead_letter_keeps_original_bytes_as_base64():
    letter = DeadLetter(
        original=b"\x00\xffraw",
        source_topic="t",
        partition=0,
        offset=1,
        error_kind="invalid_json",
        error="x",
        occurred_at=datetime.now(UTC),
    )
    wire = json.loads(encode_event(letter))
    assert wire["original"] == "AP9yYXc="
    assert decode_event(encode_event(letter)).original == b"\x00\xffraw"


def test_outcome_bounds_are_enforced():
    with pytest.raises(EventDecodeError):
        decode_event(
            b'{"type":"OutcomeReported","schema_version":"1.0","request_id":"r","quality_score":1.5}'
        )


@pytest.mark.parametrize("request_id", ["", "x" * 129])
def test_an_empty_or_overlong_request_id_is_refused(request_id):
    body = json.loads(encode_event(decision()))
    body["request_id"] = request_id
    with pytest.raises(EventDecodeError) as info:
        decode_event(json.dumps(body).encode())
    assert info.value.kind == "invalid_event"
    assert "request_id" in info.value.message
