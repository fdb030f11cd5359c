"""Encode/decode cost of one RouteDecided: routemesh's msgspec codec vs pydantic v2.

    python bench/contracts.py [--ops 20000] [--repeats 9]

Prints per-operation time (median and best of the repeats, in microseconds) for each
library and the pydantic/msgspec ratio, all measured in this run. Target: msgspec
<= 3 us each way.
"""

from __future__ import annotations

import argparse
import statistics
import timeit
import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from routemesh.contracts import (
    FormatSignals,
    LayerAttempt,
    RouteDecided,
    decode_event,
    encode_event,
)


class PLayerAttempt(BaseModel):
    model_config = ConfigDict(frozen=True)
    layer: Literal["override", "passthrough", "rules", "semantic", "fallback"]
    selected_route: str | None = None
    confidence: float | None = None
    threshold: float | None = None
    latency_ms: float = Field(default=0.0, ge=0)
    decided: bool = False
    error: str | None = None


class PFormatSignals(BaseModel):
    model_config = ConfigDict(frozen=True)
    tools_present: bool = False
    tool_history: bool = False
    tool_choice: str | None = None
    message_count: int = Field(default=0, ge=0)
    input_chars: int = Field(default=0, ge=0)
    response_format: str | None = None


class PRouteDecided(BaseModel):
    """The same fields and constraints as contracts.RouteDecided."""

    model_config = ConfigDict(frozen=True)
    type: Literal["RouteDecided"] = "RouteDecided"
    schema_version: str = "1.0"
    event_id: uuid.UUID
    occurred_at: datetime
    request_id: str
    route_id: str = Field(min_length=1, max_length=64)
    target_model: str
    reason: Literal[
        "override", "passthrough", "rule", "semantic", "low_confidence", "embedding_error",
        "default",
    ]
    layer: Literal["override", "passthrough", "rules", "semantic", "fallback"]
    score: float | None = None
    second_route_id: str | None = None
    second_score: float | None = None
    margin: float | None = None
    threshold: float | None = None
    required_margin: float | None = None
    attempts: tuple[PLayerAttempt, ...] = ()
    decision_latency_ms: float = Field(default=0.0, ge=0)
    config_source: str = ""
    config_sha256: str | None = Field(default=None, min_length=64, max_length=64)
    route_bank_sha256: str | None = Field(default=None, min_length=64, max_length=64)
    match_source: str | None = None
    match_index: int | None = None
    match_text_sha256: str | None = Field(default=None, min_length=64, max_length=64)
    match_score: float | None = None
    match_provenance: str | None = None
    prompt_sha256: str | None = Field(default=None, min_length=64, max_length=64)
    prompt_chars: int = Field(default=0, ge=0)
    format: PFormatSignals = PFormatSignals()
    requested_model: str | None = None
    gateway_instance: str = ""


def sample() -> RouteDecided:
    """A realistic semantic decision: three layer attempts, every hash set."""
    return RouteDecided(
        request_id=str(uuid.uuid4()),
        route_id="deep",
        target_model="large-model",
        reason="semantic",
        layer="semantic",
        score=0.71,
        second_route_id="lite",
        second_score=0.52,
        margin=0.19,
        threshold=0.45,
        required_margin=0.05,
        attempts=(
            LayerAttempt(layer="override", latency_ms=0.01),
            LayerAttempt(layer="rules", latency_ms=0.04),
            LayerAttempt(
                layer="semantic", selected_route="deep", confidence=0.71, threshold=0.45,
                latency_ms=4.1, decided=True,
            ),
        ),
        decision_latency_ms=4.3,
        config_source="deploy/examples/lite-deep.yaml",
        config_sha256="a" * 64,
        route_bank_sha256="b" * 64,
        match_source="team",
        match_index=17,
        match_text_sha256="c" * 64,
        match_score=0.74,
        match_provenance="deep.txt:18",
        prompt_sha256="d" * 64,
        prompt_chars=212,
        format=FormatSignals(tools_present=True, message_count=3, input_chars=230),
        requested_model="auto",
        gateway_instance="gateway-0",
        occurred_at=datetime.now(UTC),
    )


def per_op_us(fn, ops: int, repeats: int) -> tuple[float, float]:
    fn()
    times = [t / ops * 1e6 for t in timeit.repeat(fn, number=ops, repeat=repeats)]
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    event = sample()
    wire = encode_event(event)
    model = PRouteDecided.model_validate_json(wire)
    assert decode_event(wire) == event
    assert PRouteDecided.model_validate_json(model.model_dump_json()) == model

    rows = {
        ("msgspec", "encode"): per_op_us(lambda: encode_event(event), args.ops, args.repeats),
        ("msgspec", "decode"): per_op_us(lambda: decode_event(wire), args.ops, args.repeats),
        ("pydantic", "encode"): per_op_us(model.model_dump_json, args.ops, args.repeats),
        ("pydantic", "decode"): per_op_us(
            lambda: PRouteDecided.model_validate_json(wire), args.ops, args.repeats
        ),
    }
    print(f"RouteDecided, {len(wire)} bytes of JSON, {args.ops} ops x {args.repeats} repeats")
    print(f"{'library':<10}{'op':<8}{'median us':>10}{'best us':>10}")
    for (library, op), (median, best) in rows.items():
        print(f"{library:<10}{op:<8}{median:>10.2f}{best:>10.2f}")
    for op in ("encode", "decode"):
        ratio = rows[("pydantic", op)][0] / rows[("msgspec", op)][0]
        target = "meets" if rows[("msgspec", op)][0] <= 3.0 else "MISSES"
        print(f"{op}: pydantic/msgspec = {ratio:.1f}x; msgspec {target} the 3 us target")


if __name__ == "__main__":
    main()
