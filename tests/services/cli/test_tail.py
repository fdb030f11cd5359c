"""`routemesh tail` keeps stdout to JSON lines of events (safe for jq); what is no event
goes to stderr with its bytes, or to stdout with --raw."""

import base64
import json

import pytest

from routemesh.contracts import OutcomeReported, encode_event
from routemesh.services.cli.tail import _print_record

EVENT = encode_event(OutcomeReported(request_id="r1", completed=True))


@pytest.mark.parametrize("value", [b"\xff\xfe binary", b'{"type": "Nope"}', b"", None])
def test_a_value_that_is_no_event_goes_to_stderr_with_its_bytes(capsys, value):
    _print_record(value, raw=False)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("undecodable (")
    assert err.rstrip().endswith(base64.b64encode(value or b"").decode())


def test_events_are_json_lines_on_stdout_and_raw_prints_everything(capsys):
    _print_record(EVENT, raw=False)
    _print_record(b"not json\nat all", raw=True)
    out, err = capsys.readouterr()
    first, second = out.splitlines()
    assert json.loads(first)["request_id"] == "r1"
    assert second == "not json at all"
    assert err == ""
