"""`routemesh review candidates`, `review packet` and `tune --from-scores` on files."""

import json
from datetime import timedelta

import msgspec
import pytest
from typer.testing import CliRunner

from routemesh.contracts import encode_event
from routemesh.contracts.events import utc_now
from routemesh.services.audit_writer.records import build_record
from routemesh.services.cli.main import app
from routemesh.services.runtime.state import write_state
from routemesh.services.scorer.ledger import Ledger
from routemesh.services.scorer.store import State
from routemesh.services.scorer.views import view
from tests.services.scorer.events import decided, observed, outcome

CANARY = "CANARY-7f3c-prompt-text"
runner = CliRunner()


@pytest.fixture
def audit_dir(tmp_path):
    """Ten near-threshold decisions, two that failed upstream, and one fine."""
    directory = tmp_path / "audit"
    directory.mkdir()
    at = utc_now() - timedelta(hours=1)
    lines = []
    for i in range(10):
        lines.append(build_record(
            "joined", f"near{i}",
            decided(f"near{i}", "deep", 0.62, at=at, second="lite", second_score=0.41,
                    config_source="lite-deep.yaml", config_sha256="c" * 64,
                    route_bank_sha256="d" * 64),
            msgspec.structs.replace(observed(f"near{i}", "deep", at=at), prompt_tokens=42,
                                    completion_tokens=120)))
    for i in range(2):
        lines.append(build_record("joined", f"fail{i}", decided(f"fail{i}", "deep", 0.9, at=at),
                                  observed(f"fail{i}", "deep", status=502, at=at)))
    lines.append(build_record("decision_only", "fine", decided("fine", "deep", 0.9, at=at),
                              None))
    day = lines[0].day
    (directory / f"{day}.jsonl").write_bytes(
        b"".join(msgspec.json.encode(r) + b"\n" for r in lines))
    return directory


@pytest.fixture
def outcomes_file(tmp_path):
    path = tmp_path / "outcomes.jsonl"
    path.write_bytes(encode_event(outcome("near0", "lite")) + b"\n"
                     + json.dumps({"request_id": "fine", "correct_route": True}).encode() + b"\n")
    return path


def raw_local(tmp_path, request_ids):
    directory = tmp_path / "review"
    directory.mkdir()
    (directory / "2026-11-30.jsonl").write_text("".join(json.dumps({
        "request_id": r, "route_id": "deep", "reason": "semantic",
        "messages": [["user", f"{CANARY} {r}"]], "original_chars": 5000, "truncated": True,
    }) + "\n" for r in request_ids))
    return directory


def test_candidates_with_outcomes_and_capture_evidence_never_the_text(
        tmp_path, audit_dir, outcomes_file):
    review = raw_local(tmp_path, ["near1"])
    out = tmp_path / "report.json"
    md = tmp_path / "report.md"
    result = runner.invoke(app, ["review", "candidates", "--dir", str(audit_dir),
                                 "--outcomes", str(outcomes_file), "--prompt-dir", str(review),
                                 "--json-output", str(out), "--markdown-output", str(md)])
    assert result.exit_code == 0, result.output
    assert "12 review candidates among 13 requests (2 with an outcome)" in result.output
    report = json.loads(out.read_text())
    rows = {row["candidate"]["request_id"]: row for row in report["rows"]}
    assert rows["near0"]["candidate"]["reasons"] == ["near_threshold", "wrong_route"]
    assert rows["fail0"]["candidate"]["reasons"] == ["upstream_non_2xx"]
    assert rows["near1"]["evidence"] == {"present": True, "mode": "raw_local",
                                         "truncated": True, "chars": 5000}
    assert rows["near2"]["evidence"]["present"] is False
    assert [(c["reason"], c["size"]) for c in report["clusters"]] == [
        ("near_threshold", 10), ("upstream_non_2xx", 2), ("wrong_route", 1)]
    # What a reviewer needs to judge the decision, without the text.
    near = rows["near3"]["candidate"]
    assert {k: near[k] for k in ("decision_reason", "target_model", "second_score",
                                 "config_source", "config_sha256", "route_bank_sha256",
                                 "prompt_tokens", "completion_tokens")} == {
        "decision_reason": "semantic", "target_model": "deep-model", "second_score": 0.41,
        "config_source": "lite-deep.yaml", "config_sha256": "c" * 64,
        "route_bank_sha256": "d" * 64, "prompt_tokens": 42, "completion_tokens": 120}
    assert near["format"]["message_count"] >= 0
    assert report["clusters"][0]["decision_reason"] == "semantic"
    for text in (out.read_text(), md.read_text(), result.output):
        assert CANARY not in text


def test_a_packet_is_metadata_only_unless_asked_from_a_raw_local_directory(
        tmp_path, audit_dir):
    review = raw_local(tmp_path, ["near1"])
    packet = tmp_path / "packet.json"
    result = runner.invoke(app, ["review", "packet", "--dir", str(audit_dir),
                                 "--prompt-dir", str(review), "--output", str(packet)])
    assert result.exit_code == 0, result.output
    assert CANARY not in packet.read_text()
    result = runner.invoke(app, ["review", "packet", "--dir", str(audit_dir),
                                 "--prompt-dir", str(review), "--output", str(packet),
                                 "--include-prompt-text"])
    assert result.exit_code == 0, result.output
    rows = {r["candidate"]["request_id"]: r for r in json.loads(packet.read_text())["rows"]}
    assert rows["near1"]["prompt_text"] == f"{CANARY} near1"
    assert rows["near2"]["prompt_text"] is None
    assert packet.stat().st_mode & 0o777 == 0o600, "prompt text: its owner's only"


def test_prompt_text_is_refused_from_redacted_captures_and_to_stdout(tmp_path, audit_dir):
    redacted = tmp_path / "redacted"
    redacted.mkdir()
    (redacted / "captures.jsonl").write_text(json.dumps({
        "type": "PromptReviewCaptured", "request_id": "near1", "route_id": "deep",
        "reason": "semantic", "messages": [{"role": "user", "content": "[REDACTED:sk]"}],
        "original_chars": 40}) + "\n")
    result = runner.invoke(app, ["review", "packet", "--dir", str(audit_dir), "--prompt-dir",
                                 str(redacted), "--output", str(tmp_path / "p.json"),
                                 "--include-prompt-text"])
    assert result.exit_code == 1
    assert "only from a raw_local directory" in result.output
    result = runner.invoke(app, ["review", "packet", "--dir", str(audit_dir), "--output", "-"])
    assert result.exit_code == 1
    assert "local file" in result.output


def test_tune_from_scores_turns_the_saved_evidence_into_a_diff(tmp_path, lite_deep_copy):
    ledger = Ledger()
    ledger.configure({"lite": 0.6, "deep": 0.6}, "lite", None)
    at = utc_now() - timedelta(hours=2)
    for i in range(80):
        ledger.add_decision(view(decided(f"r{i}", "deep", 0.57, at=at)))
        ledger.add_outcome(view(outcome(f"r{i}", "deep", at=at)))
    state_dir = tmp_path / "scorer"
    state_dir.mkdir()
    write_state(state_dir, msgspec.msgpack.encode(State(ledger=ledger.snapshot())))
    result = runner.invoke(app, ["tune", "--config", str(lite_deep_copy), "--from-scores",
                                 "--state-dir", str(state_dir), "--apply"])
    assert result.exit_code == 0, result.output
    assert "-    threshold: 0.60\n+    threshold: 0.55" in result.output
    assert "threshold: 0.55" in lite_deep_copy.read_text()
    assert lite_deep_copy.with_name("lite-deep.yaml.bak").is_file()


def test_tune_from_scores_below_the_minimum_proposes_nothing(tmp_path, lite_deep_copy):
    state_dir = tmp_path / "scorer"
    state_dir.mkdir()
    write_state(state_dir, msgspec.msgpack.encode(State(ledger=Ledger().snapshot())))
    result = runner.invoke(app, ["tune", "--config", str(lite_deep_copy), "--from-scores",
                                 "--state-dir", str(state_dir)])
    assert result.exit_code == 0, result.output
    assert "no change proposed" in result.output


def test_a_reviewers_answer_is_checked_line_by_line_and_summarised(tmp_path, audit_dir):
    packet = tmp_path / "packet.json"
    made = runner.invoke(app, ["review", "packet", "--dir", str(audit_dir),
                               "--output", str(packet)])
    assert made.exit_code == 0, made.output
    assert "| near0 |" in (tmp_path / "packet.md").read_text(), "Markdown beside the JSON"
    schema = json.loads(runner.invoke(app, ["review", "schema"]).stdout)
    assert schema["$defs"]["ReviewAnswer"]["required"] == ["request_id", "verdict"]

    answers = tmp_path / "result.jsonl"
    good = [{"request_id": "near0", "verdict": "wrong_route", "suggested_route": "lite",
             "note": "a greeting"},
            {"request_id": "near1", "verdict": "right_route"},
            {"request_id": "fail0", "verdict": "unsure"},
            {"request_id": "ghost", "verdict": "right_route"}]
    answers.write_text("".join(json.dumps(a) + "\n" for a in good))
    out = tmp_path / "summary.json"
    summary = runner.invoke(app, ["review", "summarize", str(answers), "--packet",
                                  str(packet), "--json-output", str(out)])
    assert summary.exit_code == 0, summary.output
    figures = json.loads(out.read_text())
    assert figures["verdicts"] == {"right_route": 2, "unsure": 1, "wrong_route": 1}
    assert figures["by_route"]["deep"] == {"right_route": 1, "unsure": 1, "wrong_route": 1}
    assert figures["suggested"] == {"deep -> lite": 1}
    assert figures["not_in_packet"] == ["ghost"]
    assert figures["unanswered"] == len(json.loads(packet.read_text())["rows"]) - 3

    for bad, why in ((['{"request_id": "near2", "verdict": "maybe"}'], "result.jsonl:3:"),
                     (['{"request_id": "near2", "verdict": "wrong_route"}'],
                      "result.jsonl:3: a wrong_route verdict needs suggested_route"),
                     (['{"request_id": "near0", "verdict": "unsure"}'],
                      "result.jsonl:3: near0 was answered on line 1 already"),
                     (['{"request_id": "near2", "verdict": "unsure", "score": 1}'],
                      "result.jsonl:3:")):
        answers.write_text("".join(json.dumps(a) + "\n" for a in good[:2]) + bad[0] + "\n")
        refused = runner.invoke(app, ["review", "summarize", str(answers)])
        assert refused.exit_code == 1, bad
        assert why in refused.stderr, refused.stderr


def test_the_offline_analyzer_gives_the_scorers_figures_for_the_same_events(tmp_path):
    at = utc_now() - timedelta(hours=2)
    decisions = [decided(f"r{i}", "deep" if i % 3 else "lite", 0.5 + (i % 7) / 20,
                         at=at + timedelta(seconds=i)) for i in range(60)]
    observations = [observed(d.request_id, d.route_id, status=502 if i % 11 == 0 else 200,
                             at=d.occurred_at) for i, d in enumerate(decisions)]
    outcomes = [outcome(d.request_id, "deep" if i % 4 else "lite", at=d.occurred_at)
                for i, d in enumerate(decisions) if i % 2 == 0]
    audit = tmp_path / "audit"
    audit.mkdir()
    records = [build_record("joined", d.request_id, d, o) for d, o in zip(
        decisions, observations, strict=True)]
    (audit / f"{records[0].day}.jsonl").write_bytes(
        b"".join(msgspec.json.encode(r) + b"\n" for r in records))
    outcome_file = tmp_path / "outcomes.jsonl"
    outcome_file.write_bytes(b"".join(encode_event(o) + b"\n" for o in outcomes))

    ledger = Ledger()
    for d, o in zip(decisions, observations, strict=True):
        ledger.add_decision(view(d))
        ledger.add_observation(view(o), o.occurred_at)
    for o in outcomes:
        ledger.add_outcome(view(o))
    expected = ledger.scores(decisions[-1].occurred_at, timedelta(hours=24))

    result = runner.invoke(app, ["scores", "report", "--dir", str(audit), "--outcomes",
                                 str(outcome_file), "--window", "24h", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    found = report["scores"]
    assert found["routes"] == json.loads(msgspec.json.encode(expected.routes))
    assert found["layers"] == json.loads(msgspec.json.encode(expected.layers))
    assert (found["decisions"], found["outcomes"], found["accuracy"]) == (
        60, 30, expected.accuracy)
    semantic = next(a for a in report["attempts"] if a["layer"] == "semantic")
    accepted = sum(d.layer == "semantic" for d in decisions)
    assert (semantic["attempts"], semantic["decided"]) == (60, accepted)

    only = runner.invoke(app, ["scores", "report", "--dir", str(audit), "--layer",
                               "fallback", "--format", "json"])
    assert [x["layer"] for x in json.loads(only.stdout)["scores"]["layers"]] == ["fallback"]
    table = runner.invoke(app, ["scores", "report", "--dir", str(audit)])
    assert table.exit_code == 0
    assert "60 decisions, 0 outcomes" in table.output


def test_outcomes_in_the_audit_trail_need_no_outcome_file(tmp_path, audit_dir):
    said = outcome("near0", "lite")
    (day_file,) = audit_dir.glob("*.jsonl")
    with day_file.open("ab") as out:
        out.write(msgspec.json.encode(build_record("outcome", "near0", None, None,
                                                   outcome=said)) + b"\n")
    report = tmp_path / "report.json"
    result = runner.invoke(app, ["review", "candidates", "--dir", str(audit_dir),
                                 "--json-output", str(report)])
    assert result.exit_code == 0, result.output
    assert "among 13 requests (1 with an outcome)" in result.output
    rows = {r["candidate"]["request_id"]: r for r in json.loads(report.read_text())["rows"]}
    assert rows["near0"]["candidate"]["reasons"] == ["near_threshold", "wrong_route"]
    analyzed = json.loads(runner.invoke(app, ["scores", "report", "--dir", str(audit_dir),
                                              "--format", "json"]).stdout)
    assert analyzed["scores"]["outcomes"] == 1


def test_candidates_count_the_labelled_outcomes_learn_could_learn_from(
        tmp_path, audit_dir, outcomes_file):
    review = raw_local(tmp_path, ["near0", "near1"])
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["review", "candidates", "--dir", str(audit_dir),
                                 "--outcomes", str(outcomes_file), "--prompt-dir", str(review),
                                 "--json-output", str(out)])
    assert result.exit_code == 0, result.output
    # near0's outcome names lite and its text was captured; near1's capture has no label.
    assert json.loads(out.read_text())["learnable"] == {"lite": 1}
    assert "per expected route" in result.output
    assert "lite 1" in result.output
    without = runner.invoke(app, ["review", "candidates", "--dir", str(audit_dir),
                                  "--outcomes", str(outcomes_file)])
    assert "per expected route" not in without.output
