"""`routemesh drift report`, `pin` and `unpin` through the command line."""

import json
import random
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from routemesh.services.audit_writer.records import build_record
from routemesh.services.audit_writer.store import AuditStore
from routemesh.services.cli.main import app
from routemesh.services.drift_detector import Detector, Pinned
from routemesh.services.drift_detector.service import DriftDetectorSettings
from routemesh.services.drift_detector.store import PIN_FILE, State
from routemesh.services.runtime.state import write_state as save
from tests.services.audit_writer.helpers import DAY, decision, observation
from tests.services.drift_detector.streams import decision as decision_view

runner = CliRunner()
CONFIG_EXAMPLE = Path(__file__).resolve().parents[3] / "deploy" / "examples" / "lite-deep.yaml"


def archive(directory, *, empty_from: int) -> None:
    """200 requests a minute apart, the newest last; from ``empty_from`` on the large
    model answers with nothing."""
    store = AuditStore(directory)
    records = []
    for i in range(200):
        when = DAY - timedelta(minutes=200 - i)
        model = "large-model" if i % 2 else "small-model"
        tokens = 0 if model == "large-model" and i >= empty_from else 150 + i % 7
        records.append(build_record(
            "joined", f"r{i}", decision(f"r{i}", when, target_model=model),
            observation(f"r{i}", when, target_model=model, completion_tokens=tokens,
                        finish_reason="stop"), now=DAY))
    store.append(records)
    store.close()


def test_report_finds_the_incident_in_the_audit_files(tmp_path):
    archive(tmp_path, empty_from=150)
    result = runner.invoke(app, ["drift", "report", "--dir", str(tmp_path), "--format", "json",
                                 "--config", str(CONFIG_EXAMPLE)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["records"] == 200
    models = [(t["subject"], t["previous"], t["verdict"]["state"])
              for t in report["transitions"] if t["scope"] == "model"]
    assert models == [("small-model", "insufficient_data", "none"),
                      ("large-model", "insufficient_data", "none"),
                      ("large-model", "none", "severe")]
    final = {(s["scope"], s["subject"]): s["verdict"]["state"] for s in report["subjects"]}
    assert final[("model", "large-model")] == "severe"
    assert final[("model", "small-model")] == "none"

    recent = runner.invoke(app, ["drift", "report", "--dir", str(tmp_path), "--format", "json",
                                 "--since", "30m"])
    assert json.loads(recent.output)["records"] == 31, "the newest half hour, both ends in"
    table = runner.invoke(app, ["drift", "report", "--dir", str(tmp_path), "--preset", "low"])
    assert table.exit_code == 0
    assert "none -> severe" in table.output


def test_report_refuses_a_bad_since_with_a_clear_error(tmp_path):
    archive(tmp_path, empty_from=200)
    result = runner.invoke(app, ["drift", "report", "--dir", str(tmp_path), "--since", "soon"])
    assert result.exit_code == 2
    assert "not a duration" in result.output


def test_pin_snapshots_the_current_routing_window_and_unpin_removes_it(tmp_path):
    assert runner.invoke(app, ["drift", "pin", "--state-dir", str(tmp_path)]).exit_code == 1
    rng = random.Random(1)
    detector = Detector("normal", routing_window=50)
    for i in range(120):
        detector.add_decision(decision_view(rng, i, {"lite": 0.5, "deep": 0.5}))
    save(tmp_path, msgspec.msgpack.encode(State(detector=detector.snapshot())))
    result = runner.invoke(app, ["drift", "pin", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    pinned = msgspec.json.decode((tmp_path / PIN_FILE).read_bytes(), type=Pinned)
    assert [d.occurred_at for d in pinned.decisions] == [
        d.occurred_at for d in detector.state.decisions["*"].current]
    assert len(pinned.decisions) == 50
    assert runner.invoke(app, ["drift", "unpin", "--state-dir", str(tmp_path)]).exit_code == 0
    assert not (tmp_path / PIN_FILE).exists()


def test_a_signals_threshold_overrides_the_presets_in_the_report_and_the_service(tmp_path):
    # The large model's last 20 answers hold 3 empty ones: 0.15, under normal's 0.3.
    archive(tmp_path, empty_from=194)
    args = ["drift", "report", "--dir", str(tmp_path), "--format", "json"]

    def final(*extra: str) -> str:
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        subjects = json.loads(result.stdout)["subjects"]
        return next(s["verdict"] for s in subjects if s["subject"] == "large-model")

    assert final()["state"] == "none"
    lowered = final("--threshold", "empty_response_rate=0.1")
    assert lowered["state"] == "severe"
    assert next(s for s in lowered["signals"] if s["name"] == "empty_response_rate")[
        "threshold"] == 0.1
    wrong = runner.invoke(app, [*args, "--threshold", "empty_rate=0.2"])
    assert wrong.exit_code == 2
    assert "no such drift threshold: empty_rate" in wrong.output
    with pytest.raises(ValidationError, match="no such drift threshold: eror_rate"):
        DriftDetectorSettings(drift_thresholds={"eror_rate": 0.1})
    assert DriftDetectorSettings(drift_thresholds={"error_rate": 0.1}).drift_thresholds == {
        "error_rate": 0.1}
