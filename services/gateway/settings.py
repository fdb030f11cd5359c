"""Gateway settings (ROUTEMESH_* environment variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from routemesh.services.runtime.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    router_config: Path = Path("deploy/examples/lite-deep.yaml")
    # What decisions call the config (config_source); default: the file's base name.
    router_config_name: str | None = Field(default=None, min_length=1, max_length=128)
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535)
    upstream_base_url: str = "http://127.0.0.1:4000/v1"
    upstream_api_key: SecretStr | None = None
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_read_timeout_s: float = Field(default=120.0, gt=0)
    upstream_max_retries: int = Field(default=2, ge=0, le=10)
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    publish_queue_size: int = Field(default=10_000, ge=1)
    # Events are keyed by request id over six partitions, so at 5 ms nearly every batch
    # held one event and cost its own compression and produce request; a longer linger
    # cuts the event loop's and the broker's CPU per request (bench/gateway.py, /v1/route
    # paced). Events reach Kafka up to this much later; no request waits for them.
    kafka_linger_ms: int = Field(default=50, ge=0, le=1000)
    # Where events wait on disk while the broker is unreachable (one directory per gateway),
    # and how much they may fill: the gateway is ready (keeps serving through an outage)
    # while the spool has room; past it, events are dropped and counted.
    spool_dir: Path = Path("spool")
    spool_max_bytes: int = Field(default=1 << 30, ge=1 << 20)
    # Prompt capture for review: off (default); redacted (secrets masked, to day files in
    # review_dir on this machine only); redacted_topic (secrets masked, published to the
    # prompts.review topic: a separate choice, since the excerpts then leave the machine);
    # raw_local (unmasked, to review_dir on this machine only).
    review_capture: Literal["off", "redacted", "redacted_topic", "raw_local"] = "off"
    review_dir: Path = Path("review")
    # Of the latest user message, at most this many characters are captured.
    review_max_chars: int = Field(default=4000, ge=1, le=1_000_000)
    # Embedded default only: build or refresh the route bank in Qdrant local mode at
    # start. Against a Qdrant server the bank is built by `routemesh bank build`.
    bank_autobuild: bool = False
    # Vectors of the last N distinct texts the encoder saw (0: no cache). Repeated prompts
    # (retries, templated requests, agent loops) then skip the encoder.
    embedding_cache_size: int = Field(default=4096, ge=0, le=10_000_000)
    # A candidate config each request is decided with again after the live decision,
    # published as a shadow decision and never served; off when unset. Requests beyond
    # the queue are dropped from the shadow (counted), never delayed.
    shadow_config: Path | None = None
    shadow_config_name: str | None = Field(default=None, min_length=1, max_length=128)
    shadow_queue_size: int = Field(default=1024, ge=1, le=1_000_000)
    # Inbound auth: on unless turned off (routemesh dev turns it off). Keys are given as
    # sha256 hex digests, comma-separated and/or one per line in a file re-read on change.
    auth_enabled: bool = True
    auth_key_sha256: str = ""
    auth_keys_file: Path | None = None
