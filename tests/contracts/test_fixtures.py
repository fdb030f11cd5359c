"""Golden fixtures: every published version of every event must keep decoding, forever.

Add a fixture directory when a version is published; never edit or delete one.
"""

import json
from pathlib import Path

import pytest

from routemesh.contracts import EVENT_TYPES, decode_event, encode_event

FIXTURES = Path(__file__).parent / "fixtures"
ALL = sorted(FIXTURES.glob("v*/*.json"))


def test_every_event_type_has_a_v1_fixture():
    names = {p.stem for p in (FIXTURES / "v1").glob("*.json")}
    assert names == {t.__name__ for t in EVENT_TYPES}


@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_fixture_decodes_to_its_type_and_round_trips(path):
    data = path.read_bytes()
    event = decode_event(data)
    assert type(event).__name__ == path.stem
    assert json.loads(encode_event(event)) == json.loads(data)
