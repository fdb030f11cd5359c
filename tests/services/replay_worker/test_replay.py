"""Replays with the real encoder on the shipped examples: they reproduce `routemesh
eval`, their receipts hold, and the gate tells a mistuned config from an improvement."""

import json
import random
from pathlib import Path

import msgspec
import pytest
from typer.testing import CliRunner

from routemesh.services.cli.main import app
from routemesh.services.replay_worker import receipt as receipts
from routemesh.services.replay_worker.runner import ReplaySpec, run
from routemesh.services.router import evaluate, file_sha256, load_dataset, load_router

EXAMPLES = Path(__file__).resolve().parents[3] / "deploy" / "examples"
pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.mark.parametrize("example", ["lite-deep", "multi-route"])
def test_replaying_a_labelled_set_reproduces_eval_exactly(example):
    config, dataset = EXAMPLES / f"{example}.yaml", EXAMPLES / f"{example}.eval.jsonl"
    outcome = run(ReplaySpec(config=config, source="dataset", input=dataset, limit=0))
    report = evaluate(load_router(config), load_dataset(dataset), file_sha256(dataset))
    current = next(s for s in outcome.report.systems if s.name == "current")
    assert current.accuracy == report.accuracy
    assert {c.id: c.decisions["current"].sha256 for c in outcome.report.cases} == \
        report.decision_sha256
    baselines = {s.name: s.accuracy for s in outcome.report.systems
                 if s.kind in ("always", "rules")}
    assert baselines == {name: b.accuracy for name, b in report.baselines.items()}
    assert outcome.report.receipt.validation_passed


def _mistuned(config: Path, to: str = "0.95") -> None:
    text = config.read_text()
    config.write_text(text.replace("threshold: 0.60", f"threshold: {to}"))


@pytest.mark.parametrize("limit", [120, 0], ids=["sampled", "whole-input"])
def test_the_receipt_ignores_order_and_sees_one_byte(lite_deep_copy, tmp_path, limit):
    rows = (EXAMPLES / "lite-deep.eval.jsonl").read_text().splitlines()
    random.Random(3).shuffle(rows)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(rows) + "\n")
    # A candidate too: its figures and the flips against the current config are hashed.
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(lite_deep_copy.read_text())
    _mistuned(candidate, "0.70")

    def replayed(dataset: Path, name: str):
        return run(ReplaySpec(config=lite_deep_copy, candidate=candidate, source="dataset",
                              input=dataset, limit=limit),
                   json_output=tmp_path / name / "report.json",
                   markdown_output=tmp_path / name / "report.md")

    first = replayed(EXAMPLES / "lite-deep.eval.jsonl", "first")
    again = replayed(shuffled, "shuffled")
    assert first.report.inputs.files_sha256 != again.report.inputs.files_sha256
    assert first.report.receipt.run_hash == again.report.receipt.run_hash
    assert receipts.verify(first.receipt) == []

    lite_deep_copy.write_text(lite_deep_copy.read_text() + "# reviewed\n")
    touched = replayed(shuffled, "touched")
    assert touched.report.receipt.run_hash != first.report.receipt.run_hash

    report = first.receipt.parent / "report.json"
    data = json.loads(report.read_text())
    data["systems"][0]["accuracy"] = 1.0
    report.write_text(json.dumps(data, indent=2) + "\n")
    problems = receipts.verify(first.receipt)
    assert any("sha256 differs" in p for p in problems)
    assert any("run hash" in p for p in problems)
    result = CliRunner().invoke(app, ["replay", "verify", str(first.receipt)])
    assert result.exit_code == 1
    assert "does not hold" in result.output


def test_replay_cli_compares_a_candidate_and_writes_reports(lite_deep_copy, tmp_path):
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(lite_deep_copy.read_text())
    _mistuned(candidate)
    out = tmp_path / "out"
    args = ["replay", "--config", str(lite_deep_copy), "--candidate", str(candidate),
            "--dataset", str(EXAMPLES / "lite-deep.eval.jsonl"), "--limit", "0",
            "--json-output", str(out / "r.json"), "--markdown-output", str(out / "r.md"),
            "--history", str(tmp_path / "history")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = receipts.read_report(out / "r.json")
    delta = report.deltas[0]
    assert (delta.before, delta.after) == ("current", "candidate")
    assert delta.route_changed == len(delta.flips) > 0
    systems = {s.name: s for s in report.systems}
    broken = sum(f.verdict == "broken" for f in delta.flips)
    fixed = sum(f.verdict == "fixed" for f in delta.flips)
    assert systems["candidate"].accuracy == pytest.approx(
        systems["current"].accuracy + (fixed - broken) / len(report.cases))
    assert report.drift.status == "ok"
    assert report.drift.against_run_hash is None
    text = (out / "r.md").read_text() + (out / "r.json").read_text()
    first_prompt = json.loads((EXAMPLES / "lite-deep.eval.jsonl").read_text()
                              .splitlines()[0])["prompt"]
    assert first_prompt not in text
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert receipts.read_report(out / "r.json").drift.against_run_hash == \
        report.receipt.run_hash


def test_gate_fails_a_mistuned_config_and_passes_an_improvement(lite_deep_copy, tmp_path):
    mistuned = tmp_path / "mistuned.yaml"
    mistuned.write_text(lite_deep_copy.read_text())
    _mistuned(mistuned)
    dataset = str(EXAMPLES / "lite-deep.eval.jsonl")
    history = str(tmp_path / "history")
    worse = CliRunner().invoke(app, [
        "gate", "--config", str(mistuned), "--baseline", str(lite_deep_copy),
        "--dataset", dataset, "--out", str(tmp_path / "g1"), "--history", history])
    assert worse.exit_code == 1, worse.output
    assert "below the old config" in worse.output
    better = CliRunner().invoke(app, [
        "gate", "--config", str(lite_deep_copy), "--baseline", str(mistuned),
        "--dataset", dataset, "--out", str(tmp_path / "g2"), "--history", history])
    assert better.exit_code == 0, better.output
    gate = msgspec.json.decode((tmp_path / "g2" / "gate.json").read_bytes())
    assert gate["verdict"]["passed"] is True
    assert gate["rollback"].startswith("rollback: the previous config is mistuned.yaml")
    assert "PASS" in (tmp_path / "g2" / "gate.md").read_text()
    assert receipts.verify(tmp_path / "g2" / "replay.receipt.json") == []



def test_gate_fails_a_candidate_as_good_as_the_old_config_but_below_a_baseline(
        lite_deep_copy, tmp_path):
    """Traffic that is all deep: always-deep is right every time, the config is not; a
    candidate equal to the old config (within tolerance) still fails, on that baseline."""
    deep_only = tmp_path / "deep.jsonl"
    deep_only.write_text("".join(
        line + "\n" for line in (EXAMPLES / "lite-deep.eval.jsonl").read_text().splitlines()
        if json.loads(line)["route"] == "deep"))
    result = CliRunner().invoke(app, [
        "gate", "--config", str(lite_deep_copy), "--baseline", str(lite_deep_copy),
        "--dataset", str(deep_only), "--out", str(tmp_path / "g")])
    assert result.exit_code == 1, result.output
    verdict = msgspec.json.decode((tmp_path / "g" / "gate.json").read_bytes())["verdict"]
    assert verdict["new_accuracy"] == verdict["old_accuracy"] < 1.0
    assert (verdict["best_baseline"], verdict["best_baseline_accuracy"]) == ("always-deep", 1.0)
    assert verdict["reasons"] == [f"accuracy {verdict['new_accuracy']:.3f} is below the "
                                  "always-deep baseline's 1.000"]

def test_samples_import_cli_refuses_with_the_reason(config_path, tmp_path):
    reviewed = tmp_path / "reviewed.jsonl"
    reviewed.write_text(json.dumps({"id": "x", "prompt": "hi", "route": "small-model",
                                    "redacted": True}) + "\n"
                        + json.dumps({"id": "y", "prompt": "a joke", "route": "lite"}) + "\n"
                        + json.dumps({"id": "z", "prompt": "a joke please", "route": "lite",
                                      "redacted": True}) + "\n")
    out = tmp_path / "eval.jsonl"
    result = CliRunner().invoke(app, ["samples", "import", "--input", str(reviewed),
                                      "--config", str(config_path), "--output", str(out)])
    assert result.exit_code == 1
    assert "label 'small-model' is a target model" in result.output
    assert "not redacted" in result.output
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["z"]
