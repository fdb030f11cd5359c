"""The replay worker's parts that need no model: sampling, drift, samples import, the
shadow comparison, the embedding-endpoint check, cases from audit files and captures."""

import gzip
import json
import random
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from routemesh.contracts import CompletionObserved, OutcomeReported, RouteDecided
from routemesh.services.audit_writer.records import build_record
from routemesh.services.gateway.review import Excerpt, write_raw_local
from routemesh.services.gateway.shadow import shadow_decided
from routemesh.services.replay_worker.cases import (
    Case,
    from_audit,
    from_captures,
    input_set_sha256,
    sample,
    stored_sha256,
    with_recorded,
)
from routemesh.services.replay_worker.gate import verdict
from routemesh.services.replay_worker.receipt import Bands, Drift, Receipt, Report, drift
from routemesh.services.replay_worker.replay import (
    Inputs,
    ReplayError,
    ReplayResult,
    SystemFigures,
    check_embedding_endpoint,
)
from routemesh.services.replay_worker.samples import import_samples
from routemesh.services.replay_worker.shadow import Window, compare
from routemesh.services.router import load_config
from routemesh.services.router.config import LoadedConfig, canonical_sha256
from routemesh.services.runtime.files import Skipped


def cases(n: int) -> list[Case]:
    return [Case(id=f"c{i:04d}", text_sha256=f"{i:064x}", chars=10 + i, label="lite")
            for i in range(n)]


def test_sample_takes_the_same_cases_whatever_the_input_order():
    listed = cases(500)
    shuffled = listed[:]
    random.Random(7).shuffle(shuffled)
    chosen = sample(listed, 100)
    assert len(chosen) == 100
    assert chosen == sample(shuffled, 100)
    assert [c.id for c in chosen] == sorted(c.id for c in chosen)
    assert sample(shuffled, 0) == sample(listed, 0) == sorted(listed, key=lambda c: c.id)
    assert input_set_sha256(listed) == input_set_sha256(shuffled)
    assert input_set_sha256(listed) != input_set_sha256(listed[1:])


def _result(accuracy: float, cost: float, errors: dict | None = None) -> ReplayResult:
    return ReplayResult(
        created_at=datetime(2026, 12, 1, tzinfo=UTC),
        inputs=Inputs(source="dataset", name="x", files_sha256="f", input_set_sha256="s",
                      cases_read=10, limit=0),
        labelled=True,
        systems=[SystemFigures(name="current", kind="config", cases=10, accuracy=accuracy,
                               estimated_cost=cost)],
        deltas=[], cases=[], errors=errors or {})


def _report(result: ReplayResult) -> Report:
    receipt = Receipt(code_version="0", created_at=result.created_at, run_hash="r" * 64,
                      input_set_sha256="s", input_files_sha256="f", validation_passed=True)
    return Report(**msgspec.structs.asdict(result), receipt=receipt, drift=Drift(status="ok"))


@pytest.mark.parametrize(("accuracy", "cost", "errors", "status"), [
    (0.90, 1.00, {}, "ok"),
    (0.85, 1.10, {}, "ok"),
    (0.90, 1.25, {}, "warn"),
    (0.40, 1.00, {}, "alert"),
    (0.90, 1.00, {"embedding_error": 1}, "warn"),
])
def test_drift_warns_past_a_fifth_and_on_a_new_error_class(accuracy, cost, errors, status):
    previous = _report(_result(0.90, 1.00))
    found = drift(_result(accuracy, cost, errors), previous)
    assert found.status == status
    assert found.against_run_hash == "r" * 64
    assert drift(_result(accuracy, cost, errors), None).status == "ok"


def test_the_drift_bands_are_settings():
    previous = _report(_result(0.90, 1.00))
    moved = _result(0.90, 1.08)
    assert drift(moved, previous).status == "ok"
    assert drift(moved, previous, Bands(warn=0.05, alert=0.5)).status == "warn"
    assert drift(moved, previous, Bands(warn=0.01, alert=0.05)).status == "alert"


def test_the_same_inputs_with_another_run_hash_are_a_deterministic_violation():
    previous = _report(_result(0.90, 1.00))
    again = msgspec.structs.replace(previous.receipt, run_hash="s" * 64)
    found = drift(_result(0.90, 1.00), previous, receipt=again)
    assert (found.status, found.deterministic_violation) == ("alert", True)
    same = drift(_result(0.90, 1.00), previous, receipt=previous.receipt)
    assert (same.status, same.deterministic_violation) == ("ok", False)
    newer_code = msgspec.structs.replace(again, code_version="0.2.0")
    assert not drift(_result(0.90, 1.00), previous, receipt=newer_code).deterministic_violation


def test_samples_import_refuses_model_labels_and_unredacted_samples(config_path, tmp_path):
    loaded = load_config(config_path)
    rows = [
        {"id": "a", "prompt": "what is the capital of spain", "route": "lite",
         "redacted": True},
        {"id": "b", "prompt": "prove there are infinitely many primes",
         "route": "large-model", "redacted": True},
        {"id": "c", "prompt": "tell me a joke", "route": "lite"},
        {"id": "d", "prompt": "what is the capital of spain", "route": "lite",
         "redacted": True},
        {"id": "e", "prompt": "x", "route": "medium", "redacted": True},
        {"id": "f", "messages": [{"role": "user", "content": "design a cache"}],
         "route": "deep", "redacted": True},
        {"id": "g", "prompt": "y" * 30_000, "route": "deep", "redacted": True},
        {"id": "h", "prompt": " \n\t ", "route": "lite", "redacted": True},
        {"id": "i", "messages": [{"role": "user", "content": ""}], "route": "deep",
         "redacted": True},
        {"id": "a", "prompt": "a different text under a's id", "route": "deep",
         "redacted": True},
    ]
    path = tmp_path / "reviewed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    imported = import_samples(path, loaded)
    assert [r["id"] for r in imported.rows] == ["a", "f"]
    reasons = {q.id: q.reason for q in imported.quarantined}
    assert "target model" in reasons["b"]
    assert "'deep'" in reasons["b"]
    assert "not redacted" in reasons["c"]
    assert "duplicate" in reasons["d"]
    assert "same text as a" in reasons["d"]
    assert "no route" in reasons["e"]
    assert "too long" in reasons["g"]
    assert reasons["h"].startswith("empty_content")
    assert reasons["i"].startswith("empty_content")
    assert reasons["a"] == "duplicate_id: 'a' was exported from line 1"
    assert any(q.id is None and "not a sample" in q.reason for q in imported.quarantined)


def _decided(request_id: str, route: str) -> RouteDecided:
    return RouteDecided(request_id=request_id, route_id=route, target_model=f"{route}-model",
                        reason="semantic", layer="semantic")


def test_shadow_comparison_counts_agreement_mix_and_judged_accuracy():
    live = ["lite", "lite", "deep", "deep", "lite"]
    shadowed = ["lite", "deep", "deep", "deep", "deep"]
    decisions = [_decided(f"r{i}", r) for i, r in enumerate(live)]
    shadows = [shadow_decided(live_one, _decided(live_one.request_id, r))
               for live_one, r in zip(decisions, shadowed, strict=True)]
    decisions.append(_decided("only-live", "lite"))
    outcomes = [
        OutcomeReported(request_id="r1", expected_route="deep"),   # shadow right, live wrong
        OutcomeReported(request_id="r0", correct_route=True),     # both right (same route)
        OutcomeReported(request_id="r4", correct_route=False),    # live wrong, shadow unknown
        OutcomeReported(request_id="r2", correct_route=False),    # both wrong (same route)
    ]
    report = compare(Window(decisions, shadows, outcomes))
    assert (report.live, report.shadow, report.pairs) == (6, 5, 5)
    assert report.agreement == pytest.approx(3 / 5)
    assert report.route_mix_live == {"deep": 0.4, "lite": 0.6}
    assert report.route_mix_shadow == {"deep": 0.8, "lite": 0.2}
    assert report.judged == 3
    assert report.live_accuracy == pytest.approx(1 / 3)
    assert report.shadow_accuracy == pytest.approx(2 / 3)
    assert {(d.request_id, d.live, d.shadow) for d in report.disagreements} == {
        ("r1", "lite", "deep"), ("r4", "lite", "deep")}


def _with_encoder(loaded: LoadedConfig, **encoder) -> LoadedConfig:
    config = msgspec.structs.replace(
        loaded.config, encoder=msgspec.structs.replace(loaded.config.encoder, **encoder))
    return LoadedConfig(config, loaded.source, canonical_sha256(config), loaded.utterances)


@pytest.mark.parametrize(("url", "allowed"), [
    ("http://127.0.0.1:8000/v1", True),
    ("http://localhost:8000/v1", True),
    ("http://10.1.2.3/v1", True),
    ("https://203.0.113.9/v1", False),
    ("https://8.8.8.8/v1", False),
])
def test_a_remote_embedding_endpoint_needs_an_explicit_allowance(config_path, url, allowed):
    loaded = _with_encoder(load_config(config_path), kind="openai", base_url=url,
                           model="e")
    if allowed:
        check_embedding_endpoint(loaded, allow_remote=False)
    else:
        with pytest.raises(ReplayError, match="--allow-remote-embeddings"):
            check_embedding_endpoint(loaded, allow_remote=False)
    check_embedding_endpoint(loaded, allow_remote=True)


def test_audit_records_and_captures_become_cases(tmp_path):
    audit = tmp_path / "audit"
    audit.mkdir()
    now = datetime.now(UTC)
    lines = []
    for i, (route, age_h) in enumerate([("lite", 1), ("deep", 2), ("deep", 50)]):
        decision = msgspec.structs.replace(_decided(f"r{i}", route), prompt_chars=40,
                                           prompt_sha256="a" * 64,
                                           occurred_at=now - timedelta(hours=age_h))
        observation = CompletionObserved(request_id=f"r{i}", route_id=route,
                                         target_model="m", prompt_tokens=12,
                                         completion_tokens=30)
        lines.append(msgspec.json.encode(build_record("joined", f"r{i}", decision,
                                                      observation, now=now)))
    # The writer compresses past days: r1 is in yesterday's gzip file.
    (audit / "2026-12-01.jsonl").write_bytes(lines[0] + b"\n" + lines[2] + b"\nnot a record\n")
    (audit / "2026-11-30.jsonl.gz").write_bytes(gzip.compress(lines[1] + b"\n{\"x\": 1}\n"))
    before = stored_sha256(audit)
    skipped = Skipped()
    found = from_audit(audit, since=now - timedelta(hours=24), skipped=skipped)
    assert [c.id for c in found] == ["r0", "r1"]
    assert skipped.by_file() == {"2026-11-30.jsonl.gz": {"not_a_record": 1},
                                 "2026-12-01.jsonl": {"not_json": 1}}
    (audit / "2026-11-30.jsonl.gz").write_bytes(gzip.compress(lines[1] + b"\n"))
    assert stored_sha256(audit) != before, "the input hash covers compressed days"
    assert found[0].request is None
    assert found[0].recorded.route_id == "lite"
    assert (found[1].input_tokens, found[1].output_tokens) == (12, 30)

    captures = tmp_path / "review"
    for i, text in enumerate(["tell me a joke", "design a distributed queue"]):
        write_raw_local(captures, _decided(f"r{i}", "lite"), Excerpt(text, len(text)))
    read = with_recorded(from_captures(captures), found)
    assert [c.request.messages[-1][1] for c in read] == ["tell me a joke",
                                                         "design a distributed queue"]
    assert read[1].recorded.route_id == "deep"
    assert read[0].output_tokens == 30


def _gated(candidate: float, current: float, **baselines: float) -> Report:
    systems = [SystemFigures(name="current", kind="config", cases=10, accuracy=current),
               SystemFigures(name="candidate", kind="config", cases=10, accuracy=candidate)]
    systems += [SystemFigures(name=name.replace("_", "-"),
                              kind="rules" if name.startswith("rules") else "always",
                              cases=10, accuracy=accuracy)
                for name, accuracy in baselines.items()]
    return _report(msgspec.structs.replace(_result(current, 1.0), systems=systems))


BASELINES = {"always_lite": 0.50, "always_deep": 0.93, "rules_only": 0.91}


@pytest.mark.parametrize(("candidate", "current", "passed", "named"), [
    # Within the tolerance of the old config, but below the best baseline.
    (0.920, 0.925, False, ["below the always-deep baseline's 0.930"]),
    # Below the old config by more than the tolerance, above every baseline.
    (0.940, 0.960, False, ["below the old config's 0.960"]),
    (0.920, 0.960, False, ["below the old config's 0.960", "always-deep baseline's 0.930"]),
    (0.935, 0.940, True, []),
])
def test_the_gate_holds_the_candidate_to_the_old_config_and_the_best_baseline(
        candidate, current, passed, named):
    found = verdict(_gated(candidate, current, **BASELINES), tolerance=0.01)
    assert found.passed is passed
    assert len(found.reasons) == len(named)
    for reason, words in zip(found.reasons, named, strict=True):
        assert words in reason
    assert (found.best_baseline, found.best_baseline_accuracy) == ("always-deep", 0.93)


def test_the_gate_refuses_a_replay_that_did_not_validate():
    report = _gated(0.95, 0.95, **BASELINES)
    receipt = msgspec.structs.replace(report.receipt, validation_passed=False,
                                      problems=["bank sha256 differs"])
    found = verdict(msgspec.structs.replace(report, receipt=receipt), tolerance=0.01)
    assert not found.passed
    assert found.reasons == ["the replay did not validate: bank sha256 differs"]
