import pytest

from routemesh.contracts.topics import ROUTE_DECISIONS
from routemesh.services.runtime.kafka import create_broker
from routemesh.services.runtime.settings import ServiceSettings


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
