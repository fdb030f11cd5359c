"""`routemesh contracts export` / `check`: the checked-in schemas are what the structs give."""

from routemesh.services.cli.contracts_commands import drift, export


def test_checked_in_schemas_match_the_structs(repo_root):
    assert drift(repo_root / "contracts" / "schemas") == []


def test_drift_detects_a_changed_or_missing_file(tmp_path):
    export(tmp_path)
    assert drift(tmp_path) == []
    (tmp_path / "RouteDecided.json").write_text("{}")
    (tmp_path / "DriftAlert.json").unlink()
    assert drift(tmp_path) == ["DriftAlert.json", "RouteDecided.json"]
