"""The alert rules and the dashboard: promtool checks and unit-tests the rules, parses
every dashboard query, and every metric they name is one the services register (the
README's metrics table, which tests/integration/test_dev.py holds equal to what every
service serves)."""

import json
import re
import subprocess
from pathlib import Path

import yaml

from tests.readme import documented_metrics

from .conftest import tool

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "routemesh.json"
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "6h", "$window": "24h",
                     "${datasource}": "prometheus"}


def _expressions_of_rules() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _expressions_of_dashboard() -> list[str]:
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append(expr)
    return found


def _metric_names(expressions: list[str]) -> set[str]:
    names = set()
    for expr in expressions:
        for name in re.findall(r"\b(routemesh_[a-z0-9_]+)", expr):
            names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names


def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    promtool = tool("promtool")
    subprocess.run([promtool, "check", "rules", str(RULES)], check=True, capture_output=True)
    result = subprocess.run([promtool, "test", "rules", str(RULES.with_name("rules.test.yaml"))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it():
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load(RULES.with_name("rules.test.yaml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"]
             if case.get("exp_alerts")}
    assert alerts == fired
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in ("warning", "page"), rule["alert"]
                assert rule["annotations"]["runbook"], rule["alert"]


def test_every_dashboard_query_parses(tmp_path):
    promtool = tool("promtool")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{n}", "expr": expr}
        for n, expr in enumerate(_expressions_of_dashboard())]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_named_in_rules_and_dashboard_exists():
    named = _metric_names(_expressions_of_rules() + _expressions_of_dashboard())
    registered = set(documented_metrics())
    assert named - registered == set()
    assert len(named) >= 20, "the parse found the names"


def test_the_dashboard_has_a_data_source_variable_and_no_instance_names():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert "instance=" not in target["expr"]
            assert "job=" not in target["expr"]
