import json
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from routemesh.contracts import RouteDecided
from routemesh.services.audit_writer.records import RecordProblem, build_record, read_record
from tests.services.audit_writer.helpers import DAY, decision, observation

CANARY = "CANARY-audit-91c2"


class FutureDecided(RouteDecided, frozen=True, kw_only=True, tag="RouteDecided"):
    """A future version of the event that (wrongly) grew a text field."""

    prompt_text: str = ""
    debug: dict[str, str] = {}


def test_a_joined_record_carries_both_sides_and_its_provenance():
    d, o = decision("r1"), observation("r1")
    record = build_record("joined", "r1", d, o, now=DAY)
    assert record.request_id == "r1"
    assert record.day == "2026-11-23"
    assert record.join == "joined"
    assert record.decision.route_id == "lite"
    assert record.decision.attempts[0].layer == "semantic"
    assert record.observation.total_tokens == 30
    assert record.event_ids == (str(d.event_id), str(o.event_id))
    assert record.record_version == 1
    assert read_record(msgspec.json.encode(record)) == record


def test_the_firewall_drops_fields_that_are_not_allow_listed():
    future = FutureDecided(
        **{f: getattr(decision("r2"), f) for f in RouteDecided.__struct_fields__},
        prompt_text=f"user said {CANARY}",
        debug={"body": CANARY},
    )
    record = build_record("decision_only", "r2", future, None)
    encoded = msgspec.json.encode(record)
    assert CANARY.encode() not in encoded
    assert "prompt_text" not in json.loads(encoded)["decision"]
    assert record.observation is None


def test_observation_only_records_take_the_observations_day():
    record = build_record("observation_only", "r3", None, observation("r3"), now=DAY)
    assert (record.day, record.decision) == ("2026-11-23", None)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(prompt="x"), "unknown field `prompt`"),
        (lambda r: r["decision"].update(prompt_text="x"),
         r"unknown field `prompt_text` - at `\$.decision`"),
        (lambda r: r["decision"]["attempts"][0].update(text="x"),
         r"unknown field `text` - at `\$.decision.attempts\[0\]`"),
        (lambda r: r.update(join="maybe"), r"at `\$.join`"),
        (lambda r: r.pop("request_id"), "missing required field `request_id`"),
        (lambda r: r.update(request_id=""), r"length >= 1 - at `\$.request_id`"),
        (lambda r: r.update(day="23/11/2026"), r"at `\$.day`"),
    ],
)
def test_reading_refuses_what_the_writer_would_never_write(mutate, message):
    record = json.loads(msgspec.json.encode(build_record("joined", "r", decision("r"),
                                                         observation("r"))))
    mutate(record)
    with pytest.raises(RecordProblem, match=message):
        read_record(json.dumps(record).encode())


@pytest.mark.parametrize("claimed", [datetime(1970, 1, 1, tzinfo=UTC),
                                     datetime(2999, 1, 1, tzinfo=UTC)])
def test_an_absurd_event_time_is_filed_by_when_it_was_received(claimed):
    received = DAY + timedelta(hours=3)
    record = build_record("joined", "r", decision("r", claimed), observation("r", claimed),
                          now=received, received_at=received)
    assert record.day == "2026-11-23"
    assert record.decision.occurred_at == claimed, "both times are kept"
    assert (record.received_at, record.filed_at) == (received, received)
    close = build_record("joined", "r", decision("r", DAY), None,
                         now=received, received_at=received)
    assert (close.day, close.filed_at) == ("2026-11-23", DAY)
