import os
import subprocess
import sys
from pathlib import Path

import pytest

from routemesh.contracts.topics import ROUTE_DECISIONS
from routemesh.services.runtime.kafka import create_broker
from routemesh.services.runtime.service import discover_services
from routemesh.services.runtime.settings import ServiceSettings, unknown_variables


def test_settings_read_the_routemesh_prefix(monkeypatch):
    monkeypatch.setenv("ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS", "kafka-0:9092,kafka-1:9092")
    monkeypatch.setenv("ROUTEMESH_TOPIC_PREFIX", "staging.")
    monkeypatch.setenv("ROUTEMESH_METRICS_PORT", "9300")
    settings = ServiceSettings()
    assert settings.kafka_bootstrap_servers == "kafka-0:9092,kafka-1:9092"
    assert settings.metrics_port == 9300
    assert settings.topic(ROUTE_DECISIONS) == "staging.route.decisions.v1"


def test_standard_otel_variables_are_honoured(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-gateway")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    settings = ServiceSettings()
    assert settings.otel_service_name == "my-gateway"
    assert settings.otel_exporter_otlp_endpoint == "http://collector:4318"


def test_invalid_values_are_refused_with_the_variable_name(monkeypatch):
    monkeypatch.setenv("ROUTEMESH_METRICS_PORT", "70000")
    with pytest.raises(ValueError, match="metrics_port"):
        ServiceSettings()


def test_sasl_without_credentials_is_a_clear_error():
    settings = ServiceSettings(kafka_security_protocol="SASL_SSL")
    with pytest.raises(ValueError, match="ROUTEMESH_KAFKA_SASL_USERNAME"):
        create_broker(settings, service="t")


def test_sasl_password_is_not_shown_in_repr():
    settings = ServiceSettings(kafka_sasl_password="hunter2-secret")
    assert "hunter2-secret" not in repr(settings)


def test_a_misspelt_setting_is_named_with_the_closest_one_and_another_services_is_known():
    classes = [spec.settings_class for spec in discover_services().values()]
    found = unknown_variables({"ROUTEMESH_KAFKA_BOOTSTRAP_SERVER": "x",
                               "ROUTEMESH_SCORER_STATE_DIR": "a scorer's, fine anywhere",
                               "ROUTEMESH_GIT_COMMIT": "abc", "ROUTEMESH_QQQ": "1",
                               "OTHER_VARIABLE": "not ours"}, classes)
    assert found == ["ROUTEMESH_KAFKA_BOOTSTRAP_SERVER (did you mean "
                     "ROUTEMESH_KAFKA_BOOTSTRAP_SERVERS?)", "ROUTEMESH_QQQ"]


def test_serve_refuses_to_start_with_an_unknown_setting():
    env = {**os.environ, "ROUTEMESH_AUDIT_DIRR": "/tmp/x"}
    result = subprocess.run([sys.executable, "-m", "routemesh.services.cli.main", "serve",
                             "audit-writer"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "unknown settings: ROUTEMESH_AUDIT_DIRR (did you mean ROUTEMESH_AUDIT_DIR?)" in (
        result.stderr)


def test_a_service_built_on_the_runtime_knows_its_own_settings():
    # A user's service is not in discover_services(); its own variables are still
    # known, and a misspelt one is named against them.
    sample = Path(__file__).resolve().parents[2] / "integration" / "sample_service.py"
    env = {**os.environ, "ROUTEMESH_SAMPLE_DELAY_S": "1", "ROUTEMESH_SAMPLE_OUTT": "/tmp/x",
           "PYTHONPATH": str(sample.parents[2])}
    result = subprocess.run([sys.executable, str(sample)], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().endswith(
        "unknown settings: ROUTEMESH_SAMPLE_OUTT (did you mean ROUTEMESH_SAMPLE_OUT?)")
