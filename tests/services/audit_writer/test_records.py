import json

import msgspec
import pytest

from routemesh.contracts import RouteDecided
from routemesh.services.audit_writer.records import RecordProblem, build_record, check_record
from tests.services.audit_writer.helpers import decision, observation

CANARY = "CANARY-audit-91c2"


class FutureDecided(RouteDecided, frozen=True, kw_only=True, tag="RouteDecided"):
    """A future version of the event that (wrongly) grew a text field."""

    prompt_text: str = ""
    debug: dict[str, str] = {}


def test_a_joined_record_carries_both_sides_and_its_provenance():
    d, o = decision("r1"), observation("r1")
    record = build_record("joined", "r1", d, o)
    assert record["request_id"] == "r1"
    assert record["day"] == "2026-11-23"
    assert record["join"] == "joined"
    assert record["decision"]["route_id"] == "lite"
    assert record["decision"]["attempts"][0]["layer"] == "semantic"
    assert record["observation"]["total_tokens"] == 30
    assert record["event_ids"] == [str(d.event_id), str(o.event_id)]
    assert record["record_version"] == 1
    check_record(json.loads(msgspec.json.encode(record)))


def test_the_firewall_drops_fields_that_are_not_allow_listed():
    future = FutureDecided(
        **{f: getattr(decision("r2"), f) for f in RouteDecided.__struct_fields__},
        prompt_text=f"user said {CANARY}",
        debug={"body": CANARY},
    )
    record = build_record("decision_only", "r2", future, None)
    assert CANARY not in json.dumps(record)
    assert "prompt_text" not in record["decision"]
    assert record["observation"] is None


def test_observation_only_records_take_the_observations_day():
    record = build_record("observation_only", "r3", None, observation("r3"))
    assert (record["day"], record["decision"]) == ("2026-11-23", None)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(prompt="x"), "outside the allow-list"),
        (lambda r: r["decision"].update(prompt_text="x"), "decision fields outside"),
        (lambda r: r["decision"]["attempts"][0].update(text="x"), "attempts fields outside"),
        (lambda r: r.update(join="maybe"), "unknown join"),
        (lambda r: r.pop("request_id"), "missing request_id"),
    ],
)
def test_check_record_refuses_what_the_writer_would_never_write(mutate, message):
    record = json.loads(msgspec.json.encode(build_record("joined", "r", decision("r"),
                                                         observation("r"))))
    mutate(record)
    with pytest.raises(RecordProblem, match=message):
        check_record(record)
