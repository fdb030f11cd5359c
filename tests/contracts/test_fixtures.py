"""Golden fixtures: every published version of every event must keep decoding, forever.

Add a fixture directory when a version is published; never edit or delete one.
"""

import json
from pathlib import Path

import msgspec
import pytest

from routemesh.contracts import EVENT_TYPES, decode_event, encode_event

FIXTURES = Path(__file__).parent / "fixtures"
ALL = sorted(FIXTURES.glob("v*/*.json"))


def test_every_event_type_has_a_v1_fixture():
    names = {p.stem for p in (FIXTURES / "v1").glob("*.json")}
    assert names == {t.__name__ for t in EVENT_TYPES}


@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_fixture_decodes_to_its_type_and_round_trips(path):
    """Every field of an older version keeps its value; fields added since take their
    defaults."""
    data = path.read_bytes()
    event = decode_event(data)
    assert type(event).__name__ == path.stem
    original, encoded = json.loads(data), json.loads(encode_event(event))
    assert _as_in(original, encoded) == original
    defaults = json.loads(encode_event(type(event)(**{
        f: getattr(event, f) for f in event.__struct_fields__ if f in original
    })))
    assert {k: v for k, v in encoded.items() if k not in original} == {
        k: v for k, v in defaults.items() if k not in original
    }


def _as_in(fixture, encoded):
    """``encoded`` with only what ``fixture`` has, at every depth (fields added since are
    left out)."""
    if isinstance(fixture, dict) and isinstance(encoded, dict):
        return {key: _as_in(value, encoded.get(key)) for key, value in fixture.items()}
    if isinstance(fixture, list) and isinstance(encoded, list) and len(fixture) == len(encoded):
        return [_as_in(f, e) for f, e in zip(fixture, encoded, strict=True)]
    return encoded


def test_every_current_minor_version_has_a_fixture():
    for event_type in EVENT_TYPES:
        version = next(f.default for f in msgspec.structs.fields(event_type)
                       if f.name == "schema_version")
        assert (FIXTURES / f"v{version}" / f"{event_type.__name__}.json").is_file() or (
            version == "1.0" and (FIXTURES / "v1" / f"{event_type.__name__}.json").is_file()
        ), f"{event_type.__name__} {version} has no golden fixture"
