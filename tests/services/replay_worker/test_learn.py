"""Learning routes from reviewed traffic: the guards, the folds and the gate's verdict with
a tiny encoder; the command with the real one (``model``)."""

import json
import subprocess
import sys

import pytest

from routemesh.services.replay_worker import learn as learning
from routemesh.services.replay_worker.learn import Figures, Fitted, LearnPolicy
from routemesh.services.router import load_config, load_router
from routemesh.services.runtime.captures import Capture
from routemesh.services.runtime.files import Skipped
from tests.services.router.conftest import EXAMPLES, HashingEncoder

CONFIG = """\
version: 1
default_route: chat
margin: 0.0
encoder: {kind: local}
semantic: {dense_weight: 1.0, match_text: last_user, head: logistic}
routes:
  - id: chat
    target_model: small-model
    threshold: 0.0
    utterances:
      - tell me a joke about cats
      - what is the weather like today
      - recommend a good movie for tonight
      - how are you doing this morning
  - id: code
    target_model: code-model
    threshold: 0.0
    utterances:
      - write a python function to sort a list
      - fix this javascript bug in my loop
      - explain this sql query and its index
      - refactor my rust struct into traits
"""


@pytest.fixture
def router(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(CONFIG)
    return load_router(load_config(path), encoder=HashingEncoder())


def _capture(text: str) -> Capture:
    return Capture(mode="raw_local", chars=len(text), truncated=False, text=text)


def test_gather_learns_each_text_once_and_says_why_it_left_the_rest_out(router):
    labels = {"a": "code", "b": "code", "c": "code", "d": "chat", "e": "code-model",
              "f": "nope", "g": "chat", "h": "chat", "i": "code", "waiting": "chat"}
    captures = {
        "a": _capture("sort my python list"), "b": _capture("sort my python list"),
        "c": _capture("x" * 30), "d": _capture("a movie with cats"),
        "e": _capture("fix the loop"), "f": _capture("hello"),
        "g": _capture("same words"), "h": _capture("   "), "i": _capture("same words"),
    }
    batch = learning.gather(labels, captures, router.loaded,
                            LearnPolicy(max_chars=20, min_cap=5))
    reasons = {r.request_id: r.reason for r in batch.refused}
    assert [i.request_id for i in batch.items] == ["a", "d"]
    assert reasons["b"] == "duplicate: same text as a"
    assert reasons["c"].startswith("too long: 30 characters")
    assert "label with its route id 'code'" in reasons["e"]
    assert "'nope' is no route" in reasons["f"]
    assert reasons["g"] == reasons["i"] == (
        "conflicting labels: the same text is labelled chat and code")
    assert reasons["h"].startswith("empty_content")
    assert "waiting" not in reasons  # no capture yet: counted, not refused
    chat = batch.counts["chat"]
    assert (chat.labelled, chat.with_text, chat.learned) == (4, 3, 1)
    assert batch.counts["code"].quarantined == 3


def test_a_route_learns_at_most_its_cap_relative_to_its_utterances(router):
    labels = {f"r{n}": "code" for n in range(9)}
    captures = {f"r{n}": _capture(f"python question number {n}") for n in range(9)}
    policy = LearnPolicy(cap_per_utterance=1.5, min_cap=2)
    batch = learning.gather(labels, captures, router.loaded, policy)
    # 4 utterances at 1.5 each: 6 learned, 3 capped, the same 6 whatever the order.
    assert (batch.counts["code"].learned, batch.counts["code"].capped) == (6, 3)
    again = learning.gather(dict(reversed(labels.items())), captures, router.loaded, policy)
    assert [i.request_id for i in again.items] == [i.request_id for i in batch.items]


def test_labelled_outcomes_take_each_request_s_latest_outcome(tmp_path):
    lines = [
        {"request_id": "a", "outcome": {"occurred_at": "2026-12-04T10:00:00Z",
                                        "expected_route": "chat"}},
        {"request_id": "a", "outcome": {"occurred_at": "2026-12-04T11:00:00Z",
                                        "expected_route": "code"}},
        {"request_id": "b", "decision": {"route_id": "chat"}},
        {"request_id": "c", "outcome": {"occurred_at": "2026-12-04T10:00:00Z",
                                        "completed": True}},
    ]
    (tmp_path / "2026-12-04.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines) + "not json\n")
    skipped = Skipped()
    assert learning.labelled_outcomes(tmp_path, skipped) == {"a": "code"}
    assert skipped.by_file()


def test_folds_hold_back_some_of_every_route(router):
    items = [learning.Labelled(f"{route}{n}", route, None, f"{route}{n}")  # type: ignore[arg-type]
             for route in ("chat", "code") for n in range(4)]
    dealt = learning.folds(items, 3)
    assert sorted(i for fold in dealt for i in fold) == list(range(8))
    assert all({items[i].route for i in fold} == {"chat", "code"} for fold in dealt[:2])


def test_a_batch_contradicting_the_bank_is_refused_with_its_reason(router):
    # The bank's own utterances, each labelled as the other route.
    texts = {"chat": ["tell me a joke about cats please", "what is the weather like"],
             "code": ["write a python function to sort", "fix this javascript bug"]}
    other = {"chat": "code", "code": "chat"}
    labels = {f"{route}{n}": other[route] for route, said in texts.items()
              for n in range(len(said))}
    captures = {f"{route}{n}": _capture(text) for route, said in texts.items()
                for n, text in enumerate(said)}
    # The tiny bank's hashed words are everybody's neighbours: judge by the nearest one.
    policy = LearnPolicy(contradiction_neighbours=1)
    learned = learning.learn(router, router.matcher, labels, captures, None, policy)
    assert learned.model is None
    assert learned.receipt.reasons[0].startswith("poisoned batch: 4 of 4 labels (100%)")
    assert not learned.receipt.passed
    assert learned.receipt.route_bank_sha256_after is None


def test_nothing_to_learn_is_refused(router):
    learned = learning.learn(router, router.matcher, {"a": "chat"}, {}, None, LearnPolicy())
    assert learned.model is None
    assert learned.receipt.reasons[0].startswith("nothing to learn: 0 labelled outcomes")


def test_the_gate_refuses_a_model_worse_than_the_serving_one_or_a_baseline():
    def fitted(held: Figures, eval_: Figures | None) -> Fitted:
        return Fitted(model=None, held_back=held, eval=eval_, curve=[])  # type: ignore[arg-type]

    better = Figures(items=10, current=0.5, candidate=0.8)
    assert learning.verdict(fitted(better, None), LearnPolicy()) == []
    worse_eval = Figures(items=100, current=0.95, candidate=0.93, best_baseline="always-chat",
                         best_baseline_accuracy=0.5)
    reasons = learning.verdict(fitted(better, worse_eval), LearnPolicy())
    assert reasons == ["on the eval set (100) the new model's accuracy 0.930 is below the "
                       "serving model's 0.950"]
    assert learning.verdict(fitted(better, worse_eval), LearnPolicy(tolerance=0.05)) == []
    below_baseline = Figures(items=100, current=0.4, candidate=0.45,
                             best_baseline="always-chat", best_baseline_accuracy=0.6)
    assert "below the always-chat baseline's 0.600" in learning.verdict(
        fitted(better, below_baseline), LearnPolicy())[0]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "routemesh.services.cli.main", *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.model
def test_learn_writes_a_gated_bank_with_a_receipt_and_rolls_back(tmp_path, monkeypatch):
    """3 reviewed prompts per route of the shipped eval set: learned behind the gate,
    the receipt names them by hash only, rollback serves the old bank again; the same
    prompts with their labels rotated are refused as a poisoned batch."""
    config = EXAMPLES / "multi-route.yaml"
    rows = [json.loads(line) for line in
            (EXAMPLES / "multi-route.eval.jsonl").read_text().splitlines()]
    chosen = [row for route in sorted({r["route"] for r in rows})
              for row in [r for r in rows if r["route"] == route][:3]]
    routes = sorted({r["route"] for r in rows})

    def reviewed(directory, label) -> tuple[str, str]:
        audit, captures = directory / "audit", directory / "captures"
        audit.mkdir(parents=True)
        captures.mkdir()
        (audit / "2026-12-04.jsonl").write_text("".join(json.dumps({
            "request_id": f"r{n}", "join": "outcome", "outcome": {
                "occurred_at": "2026-12-04T10:00:00Z", "expected_route": label(row)}}) + "\n"
            for n, row in enumerate(chosen)))
        (captures / "2026-12-04.jsonl").write_text("".join(json.dumps({
            "request_id": f"r{n}", "messages": [["user", row["prompt"]]]}) + "\n"
            for n, row in enumerate(chosen)))
        return str(audit), str(captures)

    qdrant = str(tmp_path / "q")
    assert _cli("bank", "build", "--config", str(config), "--qdrant-path", qdrant
                ).returncode == 0
    audit, captures = reviewed(tmp_path / "good", lambda row: row["route"])
    planned = _cli("learn", "--config", str(config), "--audit-dir", audit, "--captures",
                   captures, "--qdrant-path", qdrant, "--out", str(tmp_path / "out"), "--plan")
    assert planned.returncode == 0, planned.stderr
    assert "expected gain on reviewed traffic like this" in planned.stdout
    assert "plan only: nothing written" in planned.stdout
    assert not (tmp_path / "out").exists()
    learned = _cli("learn", "--config", str(config), "--audit-dir", audit, "--captures",
                   captures, "--qdrant-path", qdrant, "--out", str(tmp_path / "out"))
    assert learned.returncode == 0, learned.stderr
    assert "gate passed" in learned.stdout
    receipt_path = next((tmp_path / "out").glob("*/receipt.json"))
    receipt = json.loads(receipt_path.read_text())
    assert receipt["written"]
    assert receipt["passed"]
    assert {route: c["learned"] for route, c in receipt["routes"].items()} == dict.fromkeys(
        routes, 3)
    assert len(receipt["learned_text_sha256"]) == 18
    assert receipt["eval"]["items"] == len(rows) - 18
    assert not any(row["prompt"] in receipt_path.read_text() for row in chosen)
    routed = _cli("route", "--config", str(config), "--qdrant-path", qdrant, "hello")
    assert json.loads(routed.stdout)["route_bank_sha256"] == receipt["route_bank_sha256_after"]

    rolled = _cli("learn", "rollback", "--config", str(config), "--receipt",
                  str(receipt_path), "--qdrant-path", qdrant)
    assert rolled.returncode == 0, rolled.stderr
    routed = _cli("route", "--config", str(config), "--qdrant-path", qdrant, "hello")
    assert json.loads(routed.stdout)["route_bank_sha256"] == receipt["route_bank_sha256_before"]
    again = _cli("learn", "rollback", "--config", str(config), "--receipt",
                 str(receipt_path), "--qdrant-path", qdrant)
    assert again.returncode == 1
    assert "not the one this learn wrote" in again.stderr

    audit, captures = reviewed(tmp_path / "bad", lambda row: routes[
        (routes.index(row["route"]) + 1) % len(routes)])
    refused = _cli("learn", "--config", str(config), "--audit-dir", audit, "--captures",
                   captures, "--qdrant-path", qdrant, "--out", str(tmp_path / "refused"))
    assert refused.returncode == 1
    assert "poisoned batch" in refused.stderr
    rate = json.loads(next((tmp_path / "refused").glob("*/receipt.json")).read_text()
                      )["contradiction_rate"]
    assert rate > LearnPolicy().max_contradiction_rate


def test_a_few_contradicting_labels_are_left_out_and_the_rest_learned(router):
    said = {"c0": ("sort this python list of numbers", "code"),
            "c1": ("python script to rename files", "code"),
            "c2": ("a javascript function for dates", "code"),
            "h0": ("recommend a movie about cats", "chat"),
            "h1": ("how is the weather this morning", "chat"),
            "h2": ("a joke for this morning", "chat"),
            "bad": ("tell me a joke about cats", "code")}
    labels = {rid: route for rid, (_, route) in said.items()}
    captures = {rid: _capture(text) for rid, (text, _) in said.items()}
    learned = learning.learn(router, router.matcher, labels, captures, None,
                             LearnPolicy(contradiction_neighbours=1))
    receipt = learned.receipt
    assert [r.request_id for r in receipt.refused] == ["bad"]
    assert receipt.refused[0].reason.startswith("contradicts the bank: its nearest "
                                                "utterances are all chat")
    assert (receipt.routes["code"].contradicting, receipt.routes["code"].learned) == (1, 3)
    assert len(receipt.learned_text_sha256) == 6
    assert receipt.held_back is not None
    assert receipt.held_back.items == 6
    assert [share for share, _ in receipt.curve] == [0.0, 1 / 3, 2 / 3, 1.0]
