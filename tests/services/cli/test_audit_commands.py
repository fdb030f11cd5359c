"""`routemesh audit summary` and `verify` through the command line."""

import json
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from routemesh.services.audit_writer.records import build_record
from routemesh.services.audit_writer.store import AuditStore
from routemesh.services.cli.main import app
from tests.services.audit_writer.helpers import DAY, decision, observation

runner = CliRunner()


def archive(directory):
    store = AuditStore(directory)
    store.append([build_record("joined", f"r{i}", decision(f"r{i}", DAY - timedelta(minutes=i)),
                               observation(f"r{i}", DAY - timedelta(minutes=i)), now=DAY)
                  for i in range(30)])
    store.close()


def test_summary_is_anchored_on_the_newest_record_unless_told_otherwise(tmp_path):
    archive(tmp_path)
    result = runner.invoke(app, ["audit", "summary", "--dir", str(tmp_path),
                                 "--window", "15m,1h", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["anchored_at"].startswith("2026-11-23T12:00:00")
    assert (report["windows"]["15m"]["requests"], report["windows"]["1h"]["requests"]) == (16, 30)

    moved = runner.invoke(app, ["audit", "summary", "--dir", str(tmp_path), "--window", "15m",
                                "--format", "json", "--now", "2026-11-23T11:40:00"])
    assert json.loads(moved.output)["windows"]["15m"]["requests"] == 10

    table = runner.invoke(app, ["audit", "summary", "--dir", str(tmp_path), "--window", "15m"])
    assert table.exit_code == 0
    assert "2026-11-23T12:00:00" in table.output


def test_summary_refuses_a_bad_now_with_a_clear_error(tmp_path):
    archive(tmp_path)
    result = runner.invoke(app, ["audit", "summary", "--dir", str(tmp_path), "--now", "soon"])
    assert result.exit_code == 2
    assert "not an ISO 8601 time" in result.output


@pytest.mark.parametrize("command", [
    ["audit", "summary", "--format", "json"],
    ["drift", "report", "--format", "json"],
    ["review", "candidates"],
])
def test_every_audit_reader_reports_the_lines_it_skipped_and_fails_under_strict(
        tmp_path, command):
    archive(tmp_path)
    (day_file,) = tmp_path.glob("*.jsonl")
    with day_file.open("ab") as out:
        out.write(b"not json\n{\"request_id\": 3}\n")
    found = runner.invoke(app, [*command, "--dir", str(tmp_path)])
    assert found.exit_code == 0, found.output
    assert f"skipped in {day_file.name}: 1 not_a_record, 1 not_json" in found.stderr
    if "--format" in command:
        assert json.loads(found.stdout)["skipped_lines"] == {
            day_file.name: {"not_json": 1, "not_a_record": 1}}
    strict = runner.invoke(app, [*command, "--dir", str(tmp_path), "--strict"])
    assert strict.exit_code == 1
    assert "2 unreadable line(s) skipped (--strict)" in strict.stderr
    clean = runner.invoke(app, [*command, "--dir", str(tmp_path / "none"), "--strict"])
    assert "skipped" not in clean.output
