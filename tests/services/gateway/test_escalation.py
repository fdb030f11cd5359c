"""Failover routes and escalation through deterministic gates."""

import openai
import pytest

from routemesh.contracts import CompletionObserved
from routemesh.services.router import ConfigError, RoutingConfig, parse_config
from tests.services.gateway.test_gateway import only
from tests.services.router.conftest import CONFIG


@pytest.fixture
def gateway_config() -> str:
    return CONFIG.replace(
        "    threshold: 0.40\n",
        "    threshold: 0.40\n    failover_route: deep\n    escalate_to: deep\n"
        "    gates: {min_chars: 12}\n",
        1,
    )


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="k", max_retries=0)


def load_config_text(tmp_path, text: str) -> RoutingConfig:
    return parse_config(text, "routes.yaml")


def ask(client, **extra):
    return client.chat.completions.create(
        model="lite", messages=[{"role": "user", "content": "hello"}], **extra)


def test_a_good_cheap_answer_is_not_escalated(client, gateway, behaviour):
    behaviour.content_by_model = {"small-model": "A perfectly adequate answer."}
    assert ask(client).choices[0].message.content == "A perfectly adequate answer."
    observation = only(gateway.publisher.events, CompletionObserved)
    assert observation.escalation_path == ("small-model",)
    assert observation.escalation_reason is None
    assert observation.escalation_gates == ()
    assert observation.escalation_recovered is None


@pytest.mark.parametrize(
    ("cheap", "extra", "gate"),
    [
        ("ok", {}, "too_short"),
        ("I'm sorry, but I can't help with that request.", {}, "refusal"),
        ("Sure! here is your data: {oops", {"response_format": {"type": "json_object"}},
         "invalid_json"),
    ],
)
def test_a_failed_gate_escalates_and_the_client_gets_the_strong_answer(
    client, gateway, behaviour, cheap, extra, gate
):
    behaviour.content_by_model = {"small-model": cheap, "large-model": '{"answer": "strong"}'}
    completion = ask(client, **extra)
    assert completion.choices[0].message.content == '{"answer": "strong"}'
    assert [r["model"] for r in behaviour.requests] == ["small-model", "large-model"]
    observation = only(gateway.publisher.events, CompletionObserved)
    assert observation.escalation_path == ("small-model", "large-model")
    assert observation.escalation_reason == gate
    assert observation.escalation_gates == (gate,)
    assert observation.escalation_recovered is True
    assert observation.target_model == "large-model"
    assert observation.failover_reason is None
    cheap_call, strong_call = observation.calls
    assert (cheap_call.served, cheap_call.failed_gates) == (False, (gate,))
    assert (strong_call.served, strong_call.failed_gates) == (True, ())


def test_every_failed_gate_is_recorded(client, gateway, behaviour):
    behaviour.content_by_model = {"small-model": "{no",
                                  "large-model": '{"answer": "a proper one"}'}
    ask(client, response_format={"type": "json_object"})
    observation = only(gateway.publisher.events, CompletionObserved)
    assert observation.escalation_reason == "too_short"
    assert observation.escalation_gates == ("too_short", "invalid_json")
    assert observation.escalation_recovered is True


def test_a_failed_escalation_serves_the_cheap_answer_and_says_so(client, gateway, behaviour):
    behaviour.content_by_model = {"small-model": "ok"}
    behaviour.failing_models = {"large-model"}
    completion = ask(client)
    assert completion.choices[0].message.content == "ok"
    assert [r["model"] for r in behaviour.requests] == ["small-model"] + ["large-model"] * 3
    observation = only(gateway.publisher.events, CompletionObserved)
    assert observation.target_model == "small-model", "the model whose answer was served"
    assert observation.upstream_status == 200
    assert observation.escalation_path == ("small-model", "large-model")
    assert (observation.escalation_reason, observation.escalation_gates) == (
        "too_short", ("too_short",))
    assert observation.escalation_recovered is False


def test_an_escalated_answer_that_fails_the_gates_too_is_not_recovered(
    client, gateway, behaviour
):
    behaviour.content_by_model = {"small-model": "no", "large-model": "As an AI."}
    completion = ask(client)
    # It fails two gates where the cheap answer failed one: the cheap answer is served.
    assert completion.choices[0].message.content == "no"
    observation = only(gateway.publisher.events, CompletionObserved)
    assert observation.target_model == "small-model"
    assert observation.escalation_recovered is False

    gateway.publisher.events.clear()
    behaviour.requests.clear()
    behaviour.content_by_model = {"small-model": "no", "large-model": "Nope."}
    completion = ask(client)
    # As many failed gates: the route asked for the stronger model, which is served.
    assert completion.choices[0].message.content == "Nope."
    observation = only(gateway.publisher.events, CompletionObserved)
    assert observation.target_model == "large-model"
    assert observation.escalation_recovered is False


def test_streaming_requests_are_never_escalated(client, behaviour):
    behaviour.content = "ok"
    chunks = list(ask(client, stream=True))
    assert chunks
    assert [r["model"] for r in behaviour.requests] == ["small-model"]


def test_a_failing_upstream_is_answered_by_the_failover_route(client, gateway, behaviour):
    behaviour.failing_models = {"small-model"}
    behaviour.content_by_model = {"large-model": "Answered by the failover model."}
    assert ask(client).choices[0].message.content == "Answered by the failover model."
    observation = only(gateway.publisher.events, CompletionObserved)
    assert observation.escalation_path == ("small-model", "large-model")
    assert observation.failover_reason == "upstream_failure"
    assert observation.escalation_reason is None, "a failover is no escalation"
    assert observation.upstream_status == 200
    assert observation.target_model == "large-model"
    assert observation.escalation_gates == ()
    first, second = observation.calls
    assert (first.model, first.upstream_status, first.served) == ("small-model", 503, False)
    assert (first.route_id, second.route_id) == ("lite", "deep")
    assert (second.model, second.upstream_status, second.served) == ("large-model", 200, True)
    assert second.completion_tokens == 7


def test_the_older_spelling_fallback_route_still_configures_a_failover(tmp_path):
    config = load_config_text(tmp_path, CONFIG.replace(
        "    threshold: 0.40\n", "    threshold: 0.40\n    fallback_route: deep\n", 1))
    assert config.route("lite").failover_route == "deep"
    both = CONFIG.replace("    threshold: 0.40\n",
                          "    threshold: 0.40\n    fallback_route: deep\n"
                          "    failover_route: deep\n", 1)
    with pytest.raises(ConfigError, match="not both"):
        load_config_text(tmp_path, both)


def test_when_the_fallback_fails_too_the_client_gets_a_502(client, gateway, behaviour):
    behaviour.failing_models = {"small-model", "large-model"}
    with pytest.raises(openai.APIStatusError) as info:
        ask(client)
    assert info.value.status_code == 502
    observation = only(gateway.publisher.events, CompletionObserved)
    assert observation.escalation_path == ("small-model", "large-model")
    assert (observation.upstream_status, observation.error_class) == (503, "upstream_503")
    assert observation.target_model == "large-model"
