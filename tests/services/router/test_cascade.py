import asyncio

import msgspec
import pytest
from qdrant_client import QdrantClient

from routemesh.contracts import RouteDecided, decode_event, encode_event
from routemesh.services.router.bank import build_bank, load_snapshot
from routemesh.services.router.cascade import (
    MATCH_TEXT_MAX_CHARS,
    PASSTHROUGH_ROUTE,
    Router,
    UnknownRouteError,
)
from routemesh.services.router.config import load_config
from routemesh.services.router.request import RouteRequest
from tests.services.router.conftest import HashingEncoder

CANARY = "CANARY-7f3a9c-do-not-leak"


@pytest.fixture
def router(loaded, encoder):
    client = QdrantClient(":memory:")
    build_bank(loaded, encoder, client, "bank")
    bank = load_snapshot(client, "bank", loaded.config.semantic)
    return Router(loaded, bank, encoder, instance="gw-test")


def chat(text: str, model: str | None = "auto", **body) -> RouteRequest:
    return RouteRequest.from_body(
        {"model": model, "messages": [{"role": "user", "content": text}], **body}
    )


def layers(decision: RouteDecided) -> list[tuple[str, bool]]:
    return [(a.layer, a.decided) for a in decision.attempts]


def assert_no_semantic_match(decision: RouteDecided) -> None:
    assert decision.match_source is None
    assert decision.match_index is None
    assert decision.match_text_sha256 is None
    assert decision.match_score is None
    assert decision.match_provenance is None


def test_semantic_match_carries_the_evidence(router, loaded):
    decision = router.decide(chat("what is the capital of spain"), "r1")
    assert (decision.route_id, decision.reason, decision.layer) == ("lite", "semantic", "semantic")
    assert decision.target_model == "small-model"
    assert decision.second_route_id == "deep"
    assert decision.score >= decision.threshold == 0.40
    assert decision.margin == pytest.approx(decision.score - decision.second_score)
    assert decision.margin >= decision.required_margin == 0.05
    assert decision.match_source == "inline"
    assert decision.match_index == 0
    assert decision.match_provenance == "routes.yaml:routes[0].utterances[0]"
    assert len(decision.match_text_sha256) == 64
    assert decision.config_sha256 == loaded.sha256
    assert decision.config_source == "routes.yaml", "a name, never a local path"
    assert decision.route_bank_sha256 == router.matcher.sha256
    assert decision.gateway_instance == "gw-test"
    assert layers(decision) == [("override", False), ("rules", False), ("semantic", True)]


def test_below_threshold_falls_back_with_low_confidence(loaded, encoder):
    # Thresholds above what a prompt like neither route (equally unlike both: p = 0.5
    # each) can reach.
    routes = tuple(msgspec.structs.replace(r, threshold=0.6) for r in loaded.config.routes)
    strict = msgspec.structs.replace(loaded.config, routes=routes)
    client = QdrantClient(":memory:")
    build_bank(loaded, encoder, client, "bank")
    router = Router(type(loaded)(strict, loaded.source, loaded.sha256, loaded.utterances),
                    load_snapshot(client, "bank", strict.semantic), encoder)
    decision = router.decide(chat("???"), "r2")
    assert (decision.route_id, decision.reason, decision.layer) == (
        "lite", "low_confidence", "fallback"
    )
    assert layers(decision)[-2:] == [("semantic", False), ("fallback", True)]
    semantic = decision.attempts[-2]
    assert semantic.threshold == 0.6
    assert semantic.confidence == pytest.approx(0.5), "like neither route: a coin toss"
    assert semantic.confidence < semantic.threshold
    assert_no_semantic_match(decision)


def test_a_margin_too_small_falls_back(loaded, encoder):
    strict = msgspec.structs.replace(loaded.config, margin=1.0)
    client = QdrantClient(":memory:")
    build_bank(loaded, encoder, client, "bank")
    bank = load_snapshot(client, "bank", strict.semantic)
    router = Router(type(loaded)(strict, loaded.source, loaded.sha256, loaded.utterances), bank,
                    encoder)
    decision = router.decide(chat("what is the capital of spain"), "r")
    assert decision.reason == "low_confidence"
    assert decision.score >= decision.threshold, "it cleared the threshold but not the margin"


def test_an_encoder_failure_falls_back_and_never_raises(loaded, encoder):
    client = QdrantClient(":memory:")
    build_bank(loaded, encoder, client, "bank")
    bank = load_snapshot(client, "bank", loaded.config.semantic)
    router = Router(loaded, bank, HashingEncoder(fail=True))
    decision = router.decide(chat("what is the capital of spain"), "r")
    assert (decision.route_id, decision.reason) == ("lite", "embedding_error")
    assert decision.attempts[-2].error == "ConnectionError"
    assert_no_semantic_match(decision)


def test_no_bank_is_an_embedding_error_too(loaded, encoder):
    decision = Router(loaded, None, encoder).decide(chat("hello"), "r")
    assert decision.reason == "embedding_error"


@pytest.mark.parametrize(
    ("model", "route", "target"),
    [("deep", "deep", "large-model"), ("fast", "lite", "small-model"),
     ("large-model", "deep", "large-model")],
)
def test_aliases_and_claimed_models_override(router, model, route, target):
    decision = router.decide(chat("what is the capital of spain", model), "r")
    assert (decision.route_id, decision.target_model) == (route, target)
    assert decision.reason == "override"
    assert layers(decision) == [("override", True)]
    assert_no_semantic_match(decision)


def test_the_override_header_wins_over_the_requested_model(router):
    request = RouteRequest.from_body(
        {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}, override="deep"
    )
    assert router.decide(request, "r").route_id == "deep"
    with pytest.raises(UnknownRouteError, match="unknown route 'nope'"):
        router.decide(RouteRequest(messages=(("user", "hi"),), override="nope"), "r")


def test_a_model_the_config_does_not_claim_passes_through(router):
    decision = router.decide(chat("prove that sqrt 2 is irrational", "gpt-4o-mini"), "r")
    assert (decision.route_id, decision.target_model, decision.reason) == (
        PASSTHROUGH_ROUTE, "gpt-4o-mini", "passthrough"
    )
    assert_no_semantic_match(decision)


def test_auto_and_a_missing_model_are_decided(router):
    assert router.decide(chat("tell me a joke about cats", None), "r").reason == "semantic"
    assert router.decide(chat("tell me a joke about cats", "auto"), "r").reason == "semantic"


def _router_with_aliases(config_path, encoder, aliases: str) -> Router:
    text = config_path.read_text().replace(
        "aliases: {auto: null, lite: lite, deep: deep, fast: lite, cheap-please: null}", aliases
    )
    config_path.write_text(text)
    loaded = load_config(config_path)
    client = QdrantClient(":memory:")
    build_bank(loaded, encoder, client, "bank")
    return Router(loaded, load_snapshot(client, "bank", loaded.config.semantic), encoder)


def test_auto_is_decided_by_a_config_without_aliases(config_path, encoder):
    router = _router_with_aliases(config_path, encoder, "")
    decision = router.decide(chat("tell me a joke about cats", "auto"), "r")
    assert (decision.route_id, decision.reason) == ("lite", "semantic")
    assert router.aliases == {"auto": None}


def test_a_config_may_still_map_auto_to_a_route(config_path, encoder):
    router = _router_with_aliases(config_path, encoder, "aliases: {auto: deep}")
    decision = router.decide(chat("tell me a joke about cats", "auto"), "r")
    assert (decision.route_id, decision.reason) == ("deep", "override")


@pytest.mark.parametrize(
    ("request_", "rule_route", "confidence"),
    [
        (chat("tell me a joke about cats", tools=[{"type": "function", "function": {"name": "f"}}]),
         "deep", 1.0),
        (chat("add an INDEX to my Postgres table"), "deep", 0.8),
        (chat("what is this?\n```\nx = 1\n```"), "deep", 0.7),
        (RouteRequest.from_body({"model": "auto", "messages": [
            {"role": "user", "content": f"turn {i}"} for i in range(6)]}), "deep", 1.0),
        (chat("prove that the square root of two is irrational", "cheap-please"), "lite", 1.0),
    ],
)
def test_rules_match_on_structure_and_text(router, request_, rule_route, confidence):
    decision = router.decide(request_, "r")
    assert (decision.route_id, decision.reason, decision.layer) == (rule_route, "rule", "rules")
    assert decision.score == confidence
    assert layers(decision) == [("override", False), ("rules", True)]
    assert_no_semantic_match(decision)


def test_keyword_all_needs_every_keyword(router):
    assert router.decide(chat("my postgres is slow"), "r").reason != "rule"


def test_a_request_without_user_text_goes_to_the_default(router):
    decision = router.decide(RouteRequest.from_body({"model": "auto", "messages": [
        {"role": "system", "content": "be brief"}]}), "r")
    assert (decision.route_id, decision.reason) == ("lite", "default")


def test_match_text_is_the_last_user_message_by_default(router):
    request = RouteRequest.from_body({"model": "auto", "messages": [
        {"role": "user", "content": "prove that the square root of two is irrational"},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": [{"type": "text", "text": "tell me a joke about cats"}]},
    ]})
    assert request.match_text("last_user") == "tell me a joke about cats"
    assert "irrational" in request.match_text("conversation")
    assert router.decide(request, "r").route_id == "lite"


def test_format_signals_describe_the_shape_only(router):
    request = RouteRequest.from_body({
        "model": "auto",
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [{"id": "1"}], "content": None},
            {"role": "tool", "content": "sunny"},
        ],
        "tools": [{"type": "function", "function": {"name": "weather"}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
    })
    signals = router.decide(request, "r").format
    assert signals.tools_present
    assert signals.tool_history
    assert signals.tool_choice == "auto"
    assert signals.response_format == "json_object"
    assert signals.message_count == 3
    assert signals.input_chars > request.prompt_chars


def test_no_prompt_text_reaches_the_decision(router):
    request = RouteRequest.from_body({
        "model": "auto",
        "messages": [
            {"role": "system", "content": f"system {CANARY}"},
            {"role": "user", "content": f"what is the capital of {CANARY}"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "description": CANARY}}],
    })
    for decision in (router.decide(request, "r"), router.decide(request, "r")):
        wire = encode_event(decision)
        assert CANARY.encode() not in wire
        assert b"capital" not in wire
        assert decode_event(wire) == decision
    assert router.decide(request, "r").prompt_sha256 == request.prompt_sha256
    assert request.prompt_chars == len(f"system {CANARY}") + len(f"what is the capital of {CANARY}")


def test_rules_only_baseline_skips_the_semantic_layer(router):
    decision = router.decide_rules_only(chat("what is the capital of spain"), "r")
    assert decision.reason == "low_confidence"
    assert "semantic" not in [a.layer for a in decision.attempts]


def counting_router(loaded) -> tuple[Router, HashingEncoder]:
    """A router on a bank built in memory, its encoder's calls counted from here on."""
    encoder = HashingEncoder()
    client = QdrantClient(":memory:")
    build_bank(loaded, encoder, client, "bank")
    bank = load_snapshot(client, "bank", loaded.config.semantic)
    encoder.calls.clear()
    return Router(loaded, bank, encoder), encoder


async def test_concurrent_async_decisions_share_batched_encoder_calls(loaded):
    router, encoder = counting_router(loaded)
    texts = [f"{text} {n}" for n in range(24)
             for text in ("what is the capital of spain", "prove that sqrt two is irrational")]
    decisions = await asyncio.gather(
        *(router.adecide(chat(t), f"r{i}") for i, t in enumerate(texts))
    )
    await router.aclose()
    assert sum(encoder.calls) == len(texts)
    assert len(encoder.calls) < len(texts), f"no batching happened: {encoder.calls}"
    assert max(encoder.calls) <= loaded.config.encoder.batch_size
    sync = [router.decide(chat(t), "s").route_id for t in texts]
    assert [d.route_id for d in decisions] == sync


async def test_concurrent_requests_for_one_text_encode_it_once(loaded):
    router, encoder = counting_router(loaded)
    texts = ["what is the capital of spain"] * 10 + ["prove that sqrt two is irrational"] * 10
    decisions = await asyncio.gather(
        *(router.adecide(chat(t), f"r{i}") for i, t in enumerate(texts)))
    assert sum(encoder.calls) == 2
    assert [d.route_id for d in decisions] == [router.decide(chat(t), "s").route_id
                                               for t in texts]
    # Once answered, the next request for the text is encoded again (no cache here).
    await router.adecide(chat(texts[0]), "later")
    await router.aclose()
    assert sum(encoder.calls) == 2 + 20 + 1


async def test_an_async_encoder_failure_fails_every_waiter_into_a_fallback(loaded, encoder):
    client = QdrantClient(":memory:")
    build_bank(loaded, encoder, client, "bank")
    bank = load_snapshot(client, "bank", loaded.config.semantic)
    router = Router(loaded, bank, HashingEncoder(fail=True))
    decisions = await asyncio.gather(*(router.adecide(chat(f"q {i}"), str(i)) for i in range(5)))
    await router.aclose()
    assert {d.reason for d in decisions} == {"embedding_error"}


def test_a_huge_prompt_is_cut_for_the_semantic_layer_and_the_decision_says_so(loaded):
    seen = []

    class Recording(HashingEncoder):
        def encode(self, texts):
            seen.extend(texts)
            return super().encode(texts)

    encoder = Recording()
    client = QdrantClient(":memory:")
    build_bank(loaded, encoder, client, "bank")
    router = Router(loaded, load_snapshot(client, "bank", loaded.config.semantic), encoder)
    seen.clear()
    huge = "prove that the square root of two is irrational " + "filler " * 30_000 + "the end"
    decision = router.decide(chat(huge), "r")
    (text,) = seen
    assert len(text) <= MATCH_TEXT_MAX_CHARS + 1
    assert text.startswith("prove that")
    assert text.endswith("the end")
    assert decision.format.match_text_cut is True
    assert decision.prompt_chars == len(huge), "the prompt's own size is still recorded"
    assert router.decide(chat("a short one"), "r").format.match_text_cut is False
