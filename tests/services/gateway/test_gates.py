import pytest

from routemesh.services.gateway.gates import failed_gates
from routemesh.services.router import RouteRequest
from routemesh.services.router.config import EscalationGates

GATES = EscalationGates(min_chars=10)


def req(fields: dict) -> RouteRequest:
    """The request as routing extracted it, from the body fields the gates read."""
    return RouteRequest.from_body({"messages": [{"role": "user", "content": "q"}], **fields})


def answer(content=None, tool_calls=None):
    message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"choices": [{"message": message, "finish_reason": "stop"}]}


@pytest.mark.parametrize(
    ("request_", "response", "gates"),
    [
        ({}, answer("A perfectly fine answer."), []),
        ({}, answer(""), ["empty"]),
        ({}, answer("   "), ["empty"]),
        ({}, {"choices": []}, ["empty"]),
        ({}, "not even an object", ["empty"]),
        ({}, None, ["empty"]),
        ({}, answer("Yes."), ["too_short"]),
        ({}, answer("I'm sorry, but I can't do that for you."), ["refusal"]),
        ({}, answer("As an AI, I have no opinion on this matter."), ["refusal"]),
        ({}, answer("I cannot."), ["too_short", "refusal"]),
        ({"response_format": {"type": "json_object"}}, answer("here you go: {bad"),
         ["invalid_json"]),
        ({"response_format": {"type": "json_object"}}, answer("{bad"),
         ["too_short", "invalid_json"]),
        ({"response_format": {"type": "json_object"}}, answer('{"answer": 42, "ok": true}'),
         []),
        ({"response_format": "json"}, answer("not json, but not asked for properly"), []),
        ({"tools": [{"type": "function"}], "tool_choice": "required"},
         answer("I would call the tool now."), ["tool_call_missing"]),
        ({"tools": [{"type": "function"}], "tool_choice": "required"},
         answer(None, [{"id": "1", "type": "function"}]), []),
        ({"tools": [{"type": "function"}], "tool_choice": "auto"},
         answer("No tool needed here, thanks."), []),
    ],
)
def test_every_failing_gate_is_named(request_, response, gates):
    assert failed_gates(req(request_), response, GATES) == gates


def test_the_defaults_catch_short_answers_and_hedges():
    defaults = EscalationGates()
    assert defaults.min_chars == 80
    long_enough = "x" * 80
    assert failed_gates(req({}), answer(long_enough), defaults) == []
    assert failed_gates(req({}), answer(long_enough[:-1]), defaults) == ["too_short"]
    for hedge in ("As an AI", "I cannot", "I'm sorry, but", "I don't have access",
                  "I am unable to"):
        assert failed_gates(req({}), answer(f"{hedge} {long_enough}"), defaults) == ["refusal"]


def test_phrases_match_whatever_their_case():
    gates = EscalationGates(min_chars=1, refusal_phrases=("Out Of Scope",))
    assert failed_gates(req({}), answer("that is out of scope here"), gates) == ["refusal"]


def test_gates_can_be_turned_off():
    relaxed = EscalationGates(min_chars=1, json_when_asked=False, refusal_phrases=())
    assert failed_gates(req({"response_format": {"type": "json_object"}}),
                        answer("As an AI: not json"), relaxed) == []
