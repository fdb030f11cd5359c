"""Settings every service shares. Each service subclasses ``ServiceSettings`` once.

All configuration comes from ``ROUTEMESH_*`` environment variables (or a ``.env`` file);
the OpenTelemetry variables keep their standard names and meaning.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from routemesh.contracts import DEFAULT_PREFIX, Topic

# Where local-mode Qdrant lives when no location is set, relative to the working directory.
QDRANT_DEFAULT_PATH = Path(".routemesh/qdrant")


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ROUTEMESH_", env_file=".env", extra="ignore", frozen=True
    )

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = DEFAULT_PREFIX
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    # Real Kafka supports idempotent producers; the embedded Tansu broker does not
    # (it answers InitProducerId with an error), so `routemesh dev` turns this off.
    kafka_idempotent_producer: bool = True
    kafka_compression: Literal["gzip", "snappy", "lz4", "zstd"] | None = "gzip"
    # How long a producer waits to fill a batch. Nothing of ours waits on delivery in a
    # request path, so this trades event latency for broker and producer CPU.
    kafka_linger_ms: int = Field(default=5, ge=0, le=1000)
    # The most a producer puts in one batch per partition. aiokafka sends one batch per
    # partition at a time, so a publisher of many events at once (the drift detectors'
    # repartition, a changelog) gets a batch per broker round trip: 16 KiB, aiokafka's
    # default, capped them at one round trip per ~15 events per partition
    # (bench/scale_out.py --service drift-detector).
    kafka_max_batch_bytes: int = Field(default=256 * 1024, ge=16 * 1024, le=1024 * 1024)

    # Where the exported encoder is (router/encoders.py default_model_dir reads it wherever
    # an encoder is built): the image's build-time export; default ~/.cache/routemesh/models.
    model_dir: Path | None = None

    # A Qdrant server, else local mode in this directory (QDRANT_DEFAULT_PATH when
    # neither is set: the same place for `routemesh bank build` and every service).
    qdrant_url: str | None = None
    qdrant_path: Path | None = None
    qdrant_api_key: SecretStr | None = None

    # A dead letter carries at most this much of its original; a larger original is stored
    # whole in dead_letter_dir (named by its sha256) and the event says so.
    dead_letter_max_bytes: int = Field(default=256 * 1024, ge=1024, le=8 * 1024 * 1024)
    dead_letter_dir: Path = Path("dead-letters")
    # A consumer that has not finished a poll for this long is not ready.
    consumer_stall_s: float = Field(default=60.0, gt=0)
    # An event loop that has not run for this long fails /healthz (the process is stuck).
    liveness_stall_s: float = Field(default=60.0, gt=0)

    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    instance_id: str | None = None
    shutdown_timeout_s: float = Field(default=8.0, gt=0)

    otel_service_name: str | None = Field(
        default=None, validation_alias=AliasChoices("OTEL_SERVICE_NAME")
    )
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"
        ),
    )

    def topic(self, topic: Topic) -> str:
        return topic.name(self.topic_prefix)

    def qdrant_location(self) -> tuple[str | None, Path | None]:
        """The Qdrant server URL, or else the local-mode directory (never neither)."""
        if self.qdrant_url:
            return self.qdrant_url, None
        return None, self.qdrant_path or QDRANT_DEFAULT_PATH

    def qdrant_described(self) -> str:
        url, path = self.qdrant_location()
        return url or f"{path} (local mode)"


PREFIX = "ROUTEMESH_"
# Read by routemesh outside the settings classes: the image's source revision (receipts).
OTHER_VARIABLES = frozenset({"ROUTEMESH_GIT_COMMIT"})


def variable_names(settings_class: type[ServiceSettings]) -> set[str]:
    """The ``ROUTEMESH_*`` variables a settings class reads."""
    return {PREFIX + name.upper() for name, field in settings_class.model_fields.items()
            if field.validation_alias is None}


def unknown_variables(environ: Mapping[str, str],
                      classes: Iterable[type[ServiceSettings]]) -> list[str]:
    """Every ``ROUTEMESH_*`` variable no service reads, each with the closest name that
    one does: a misspelt setting would otherwise be ignored without a word. A variable
    of another service is known (one environment may serve them all)."""
    known = set(OTHER_VARIABLES).union(*(variable_names(c) for c in classes))
    found = []
    for name in sorted(n for n in environ if n.startswith(PREFIX) and n not in known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        found.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return found
