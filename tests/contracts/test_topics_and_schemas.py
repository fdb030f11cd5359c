import json

import jsonschema
import pytest
import yaml

from routemesh.contracts import (
    EVENT_TYPES,
    TOPICS,
    RouteDecided,
    ShadowDecided,
    topic_by_suffix,
    topic_for_event,
)
from routemesh.contracts.schema_export import _normalised, event_schema, render

EXPECTED_SUFFIXES = {
    "route.decisions.v1",
    "route.shadow_decisions.v1",
    "llm.observations.v1",
    "route.outcomes.v1",
    "drift.alerts.v1",
    "route.scores.v1",
    "replay.requests.v1",
    "replay.results.v1",
    "routebank.changes.v1",
    "prompts.review.v1",
    "dlq.v1",
    "drift.inputs.v1",
}


def test_registry_has_every_topic_once_and_every_event_has_a_topic():
    assert {t.suffix for t in TOPICS} == EXPECTED_SUFFIXES
    assert len(TOPICS) == len(EXPECTED_SUFFIXES)
    for event_type in EVENT_TYPES:
        assert event_type in topic_for_event(event_type).events


def test_the_decisions_topic_carries_no_shadow_decision():
    """A consumer of route.decisions.v1 gets one RouteDecided per request: a shadow
    decision arriving there is not of the topic's type."""
    decisions, shadows = topic_by_suffix("route.decisions.v1"), topic_by_suffix(
        "route.shadow_decisions.v1")
    assert decisions.events == (RouteDecided,)
    assert shadows.events == (ShadowDecided,)
    assert shadows.key_field == decisions.key_field == "request_id"
    assert shadows.partitions == decisions.partitions


def test_prefix_is_configurable_and_request_id_is_the_key():
    topic = topic_by_suffix("route.decisions.v1")
    assert topic.name() == "routemesh.route.decisions.v1"
    assert topic.name("staging.") == "staging.route.decisions.v1"
    event = RouteDecided(
        request_id="req-7", route_id="lite", target_model="m", reason="rule", layer="rules"
    )
    assert topic.key_for(event) == b"req-7"


def test_unknown_topic_lists_the_known_ones():
    with pytest.raises(LookupError, match=r"route\.decisions\.v1"):
        topic_by_suffix("nope.v1")


def test_descriptions_compare_by_meaning_not_by_a_librarys_indentation():
    # msgspec 0.22 kept a docstring's indentation in ``description``, 0.23 strips it.
    as_022 = {"description": "First line.\n\n    Second, indented.", "properties": [
        {"description": "  Nested.\n      More."}]}
    as_023 = {"description": "First line.\n\nSecond, indented.", "properties": [
        {"description": "Nested.\nMore."}]}
    assert _normalised(as_022) == _normalised(as_023) == as_023


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.__name__)
def test_golden_fixtures_validate_against_the_exported_json_schema(event_type, repo_root):
    schema = event_schema(event_type)
    jsonschema.Draft202012Validator.check_schema(schema)
    fixture = repo_root / "tests" / "contracts" / "fixtures" / "v1" / f"{event_type.__name__}.json"
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(
        json.loads(fixture.read_text())))
    assert errors == []


def test_asyncapi_lists_every_topic_with_its_messages_and_payloads():
    document = yaml.safe_load(render()["asyncapi.yaml"])
    assert document["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in document["channels"].values()}
    assert addresses == {f"routemesh.{s}" for s in EXPECTED_SUFFIXES}
    schemas = document["components"]["schemas"]
    for message in document["components"]["messages"].values():
        ref = message["payload"]["$ref"].rsplit("/", 1)[1]
        assert ref in schemas
    for operation in document["operations"].values():
        assert operation["action"] == "receive"
