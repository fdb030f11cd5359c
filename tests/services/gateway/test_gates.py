import pytest

from routemesh.services.gateway.gates import failed_gate
from routemesh.services.router.config import EscalationGates

GATES = EscalationGates(min_chars=10)


def answer(content=None, tool_calls=None):
    message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"choices": [{"message": message, "finish_reason": "stop"}]}


@pytest.mark.parametrize(
    ("request_", "response", "gate"),
    [
        ({}, answer("A perfectly fine answer."), None),
        ({}, answer(""), "empty"),
        ({}, answer("   "), "empty"),
        ({}, {"choices": []}, "empty"),
        ({}, "not even an object", "empty"),
        ({}, answer("Yes."), "too_short"),
        ({}, answer("I'm sorry, but I can't do that for you."), "refusal"),
        ({}, answer("As an AI, I have no opinion on this matter."), "refusal"),
        ({"response_format": {"type": "json_object"}}, answer("here you go: {bad"),
         "invalid_json"),
        ({"response_format": {"type": "json_object"}}, answer('{"answer": 42, "ok": true}'),
         None),
        ({"tools": [{"type": "function"}], "tool_choice": "required"},
         answer("I would call the tool now."), "tool_call_missing"),
        ({"tools": [{"type": "function"}], "tool_choice": "required"},
         answer(None, [{"id": "1", "type": "function"}]), None),
        ({"tools": [{"type": "function"}], "tool_choice": "auto"},
         answer("No tool needed here, thanks."), None),
    ],
)
def test_each_gate(request_, response, gate):
    assert failed_gate(request_, response, GATES) == gate


def test_gates_can_be_turned_off():
    relaxed = EscalationGates(min_chars=1, json_when_asked=False, refusal_phrases=())
    assert failed_gate({"response_format": {"type": "json_object"}},
                       answer("As an AI: not json"), relaxed) is None
