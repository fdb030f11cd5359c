"""Versioned routemesh events.

Rules every struct here follows (consumers in other languages rely on them):
- frozen, keyword-only, tagged by class name in the ``type`` field;
- ``schema_version`` is ``"MAJOR.MINOR"``; a minor bump only adds fields with defaults,
  a major bump is a new topic version;
- no field ever carries prompt text, completion text, a request body or a credential
  (``PromptReviewCaptured`` is the one opt-in exception, on its own topic, redacted).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec

UtcDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
# Length bounds only: a regex per field multiplies decode time (bench/contracts.py);
# producers create these values (hashlib hexdigest, validated router config), so the
# character set is enforced where they are made, not on every decode.
Sha256Hex = Annotated[str, msgspec.Meta(min_length=64, max_length=64)]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]
Count = Annotated[int, msgspec.Meta(ge=0)]
# Route ids double as Prometheus label values; the router config restricts their characters.
RouteId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
# The Kafka key of a request's events and the join key of every consumer: never empty.
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
# A client's own id for a request, checked at the edge (the characters of a request id).
CorrelationId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]

DecisionReason = Literal[
    "override", "passthrough", "rule", "semantic", "low_confidence", "embedding_error", "default"
]
DecisionLayer = Literal["override", "passthrough", "rules", "semantic", "fallback"]
Severity = Literal["none", "mild", "severe"]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """Fields every event carries. A minor bump overrides ``schema_version``'s default."""

    schema_version: str = "1.0"
    event_id: uuid.UUID = msgspec.field(default_factory=uuid.uuid4)
    occurred_at: UtcDatetime = msgspec.field(default_factory=utc_now)


class LayerAttempt(msgspec.Struct, frozen=True, kw_only=True):
    """One cascade layer's try at a request, whether or not it decided."""

    layer: DecisionLayer
    selected_route: RouteId | None = None
    confidence: float | None = None
    threshold: float | None = None
    latency_ms: NonNegative = 0.0
    decided: bool = False
    error: str | None = None


class FormatSignals(msgspec.Struct, frozen=True, kw_only=True):
    """Shape of the request, never its content.

    ``tool_choice`` is one of ``none``, ``auto``, ``required``, ``function`` or ``other``;
    ``response_format`` one of ``text``, ``json_object``, ``json_schema`` or ``other``:
    enumerations, never what the client wrote (producers before the gateway of RouteDecided
    1.3 copied the client's string; such values still decode)."""

    tools_present: bool = False
    tool_history: bool = False
    tool_choice: str | None = None
    message_count: Count = 0
    input_chars: Count = 0
    response_format: str | None = None
    # The text matched semantically was cut to its start and end (RouteDecided 1.1).
    match_text_cut: bool = False


class RouteDecided(Event, frozen=True, kw_only=True):
    """One request's route, why, and the evidence; never the prompt.

    1.1: ``format.match_text_cut``. 1.2: ``shadow``. 1.3: ``client_request_id``.

    ``request_id`` is the mesh's own, unique per request; ``client_request_id`` is the
    client's ``x-request-id`` as it came (validated, bounded), for correlation only: two
    requests may share it.
    """

    schema_version: str = "1.3"
    request_id: RequestId
    route_id: RouteId
    target_model: str
    reason: DecisionReason
    layer: DecisionLayer
    score: float | None = None
    second_route_id: RouteId | None = None
    second_score: float | None = None
    margin: float | None = None
    threshold: float | None = None
    required_margin: float | None = None
    attempts: tuple[LayerAttempt, ...] = ()
    decision_latency_ms: NonNegative = 0.0
    config_source: str = ""
    config_sha256: Sha256Hex | None = None
    route_bank_sha256: Sha256Hex | None = None
    match_source: str | None = None
    match_index: int | None = None
    match_text_sha256: Sha256Hex | None = None
    match_score: float | None = None
    match_provenance: str | None = None
    prompt_sha256: Sha256Hex | None = None
    prompt_chars: Count = 0
    format: FormatSignals = FormatSignals()
    requested_model: str | None = None
    gateway_instance: str = ""
    # 1.2 only: a shadow decision published on this topic. Since 1.3 shadow decisions are
    # ``ShadowDecided`` on their own topic and this is never true; it stays so that 1.2
    # events decode. A consumer may skip a decision that has it set.
    shadow: bool = False
    client_request_id: CorrelationId | None = None


ShadowDifference = Literal["route_id", "reason", "target_model", "match_source"]


class ShadowDecided(Event, frozen=True, kw_only=True):
    """What the gateway's shadow (candidate) config decided for a request the live config
    decided and served; never served itself. On its own topic, one per request decided
    with a shadow config running, with its own ``event_id``: ``route.decisions.v1`` keeps
    exactly one decision per request. ``live_event_id`` names the live ``RouteDecided``;
    the ``live_*`` fields and ``differs`` say what the shadow changed. Never the prompt."""

    schema_version: str = "1.0"
    request_id: RequestId
    live_event_id: uuid.UUID
    route_id: RouteId
    target_model: str
    reason: DecisionReason
    layer: DecisionLayer
    score: float | None = None
    second_route_id: RouteId | None = None
    second_score: float | None = None
    margin: float | None = None
    threshold: float | None = None
    match_source: str | None = None
    match_index: int | None = None
    match_text_sha256: Sha256Hex | None = None
    decision_latency_ms: NonNegative = 0.0
    config_source: str = ""
    config_sha256: Sha256Hex | None = None
    route_bank_sha256: Sha256Hex | None = None
    live_route_id: RouteId
    live_reason: DecisionReason
    live_target_model: str
    live_config_sha256: Sha256Hex | None = None
    differs: tuple[ShadowDifference, ...] = ()
    gateway_instance: str = ""


FailoverReason = Literal["upstream_failure"]


class UpstreamCall(msgspec.Struct, frozen=True, kw_only=True):
    """One call to an upstream model for a request, served or not (CompletionObserved
    1.2): what a model did, so that its own failures count against it even when another
    model's answer was served. Never the answer's content."""

    model: str
    route_id: RouteId | None = None
    upstream_status: int | None = None
    error_class: str | None = None
    duration_ms: NonNegative = 0.0
    served: bool = False
    # Of a whole answer (not of a stream, which is described by the observation itself).
    completion_tokens: Count | None = None
    finish_reason: str | None = None
    tools_used: bool = False
    # The escalation gates this answer failed.
    failed_gates: tuple[str, ...] = ()


class CompletionObserved(Event, frozen=True, kw_only=True):
    """One request's upstream calls: what was served, how it went, and any failover or
    escalation.

    1.1: ``escalation_gates`` and ``escalation_recovered``; ``target_model`` is the model
    whose answer was served. 1.2: ``calls`` (every upstream call, served or not) and
    ``failover_reason``; from 1.2 ``escalation_reason`` is only ever a gate (an upstream
    failure answered by the failover route is ``failover_reason``; 1.1 wrote it into
    ``escalation_reason`` as ``upstream_failure``).
    """

    schema_version: str = "1.2"
    request_id: RequestId
    route_id: RouteId
    target_model: str
    upstream_status: int | None = None
    duration_ms: NonNegative = 0.0
    ttft_ms: NonNegative | None = None
    prompt_tokens: Count | None = None
    completion_tokens: Count | None = None
    total_tokens: Count | None = None
    finish_reason: str | None = None
    tools_requested: bool = False
    tools_used: bool = False
    stream: bool = False
    # upstream_<status>, connect_error, connect_timeout, read_timeout or disconnected.
    error_class: str | None = None
    # The models tried, in order (a failover's and an escalation's alike), and the first
    # gate the cheap answer failed when it was escalated.
    escalation_path: tuple[str, ...] = ()
    escalation_reason: str | None = None
    # Every gate the first answer failed (escalation_reason names the first of them).
    escalation_gates: tuple[str, ...] = ()
    # Whether the escalated answer passed the gates; None when nothing was escalated.
    escalation_recovered: bool | None = None
    # 1.2: every upstream call in order; why the route's failover route answered.
    calls: tuple[UpstreamCall, ...] = ()
    failover_reason: FailoverReason | None = None


class OutcomeReported(Event, frozen=True, kw_only=True):
    """What the caller learned about a request, possibly hours after it was answered.

    1.1: ``completion_time_s``, how long the caller's task took to complete, by its own
    clock (the scorer's slow-request review reason uses it where the answer's duration
    says little, as for agent loops)."""

    schema_version: str = "1.1"
    request_id: RequestId
    completed: bool | None = None
    correct_route: bool | None = None
    expected_route: RouteId | None = None
    quality_score: Probability | None = None
    labels: Annotated[tuple[Label, ...], msgspec.Meta(max_length=16)] = ()
    source: Label | None = None
    completion_time_s: NonNegative | None = None


DriftVerdict = Literal["insufficient_data", "none", "mild", "severe"]


class DriftSignal(msgspec.Struct, frozen=True, kw_only=True):
    """One drift signal as judged: its value (None when the window lacks what it needs),
    the preset's threshold, and whether it is flagged."""

    name: str
    value: float | None = None
    threshold: float
    flagged: bool = False
    severity: Severity = "none"


class DriftAlert(Event, frozen=True, kw_only=True):
    """A subject's drift verdict changed. Published once per change, never per event; the
    ``event_id`` is the change's identity, so the same change computed twice (after a
    restart) is the same event.

    1.1 adds the whole verdict: ``verdict`` and ``previous_verdict`` (``insufficient_data``
    included, which 1.0's ``severity`` reports as ``none``), every signal, the reason in
    words, the window and its baseline, and the hashes of what was routing. The 1.0
    fields describe the verdict's leading signal."""

    schema_version: str = "1.1"
    scope: Literal["model", "route"]
    # A target model, a route id, or "*" for all routing.
    subject: str
    signal: str
    severity: Severity
    previous_severity: Severity
    value: float
    baseline: float | None = None
    window_seconds: NonNegative = 0.0
    sample_size: Count = 0
    sensitivity: Literal["low", "normal", "high"] = "normal"
    verdict: DriftVerdict | None = None
    previous_verdict: DriftVerdict | None = None
    signals: tuple[DriftSignal, ...] = ()
    reason: str = ""
    window_start: UtcDatetime | None = None
    window_end: UtcDatetime | None = None
    baseline_samples: Count = 0
    # "preceding": the window before this one; "pinned": a snapshot `routemesh drift pin`
    # wrote, identified by its sha256.
    baseline_kind: Literal["preceding", "pinned"] | None = None
    baseline_sha256: Sha256Hex | None = None
    config_sha256: Sha256Hex | None = None
    route_bank_sha256: Sha256Hex | None = None
    # Set when the config or the route bank changed shortly before the transition.
    likely_cause: str | None = None


FeedbackClass = Literal["correct_routing", "threshold_too_high", "threshold_too_low"]


class RouteScore(msgspec.Struct, frozen=True, kw_only=True):
    """One route's figures over a window (1.1 adds everything after ``mean_quality``).

    ``accuracy`` is correct ÷ outcomes that say whether the route was right; ``capture``
    is this route's share of all decisions. The feedback counts classify each outcome of
    a semantic decision: ``threshold_too_high`` fell back below the threshold although
    the top route was right, ``threshold_too_low`` was accepted above it and wrong."""

    route_id: RouteId
    decisions: Count = 0
    outcomes: Count = 0
    correct: Count = 0
    accuracy: Probability | None = None
    mean_quality: Probability | None = None
    capture_rate: Probability | None = None
    mean_confidence: float | None = None
    p95_decision_latency_ms: NonNegative | None = None
    correct_routing: Count = 0
    threshold_too_high: Count = 0
    threshold_too_low: Count = 0


class LayerScore(msgspec.Struct, frozen=True, kw_only=True):
    """One cascade layer's figures over a window; ``capture_rate`` is the share of all
    decisions this layer made (1.1 adds it and what follows)."""

    layer: DecisionLayer
    decisions: Count = 0
    outcomes: Count = 0
    correct: Count = 0
    accuracy: Probability | None = None
    capture_rate: Probability | None = None
    mean_confidence: float | None = None
    p95_decision_latency_ms: NonNegative | None = None


class ThresholdRecommendation(msgspec.Struct, frozen=True, kw_only=True):
    """Advice on one route's threshold with its evidence (1.1 adds ``samples`` and what
    follows). The changes are what the outcomes seen would have had under the
    recommended threshold; the interval is 95 % (Wilson, on the share of changed
    decisions that the move makes right); ``patch`` is a unified diff of the route YAML."""

    route_id: RouteId
    current_threshold: float
    recommended_threshold: float
    below_threshold_but_right: Count = 0
    above_threshold_but_wrong: Count = 0
    rationale: str = ""
    samples: Count = 0
    accuracy_change: float | None = None
    accuracy_change_low: float | None = None
    accuracy_change_high: float | None = None
    fallback_rate_change: float | None = None
    route_share_change: float | None = None
    patch: str = ""


class ReviewCandidate(msgspec.Struct, frozen=True, kw_only=True):
    """A request a human should look at, by metadata only (1.1 adds everything after
    ``score``; RouteScores 1.2 what follows ``expected_route``: what a reviewer needs to
    judge the decision without the text); ``reasons`` lists every reason it qualifies
    for."""

    request_id: RequestId
    reasons: tuple[str, ...]
    cluster: str
    route_id: RouteId | None = None
    score: float | None = None
    occurred_at: UtcDatetime | None = None
    second_route_id: RouteId | None = None
    top_route_id: RouteId | None = None
    match_source: str | None = None
    match_index: int | None = None
    match_text_sha256: Sha256Hex | None = None
    threshold: float | None = None
    margin: float | None = None
    upstream_status: int | None = None
    duration_ms: NonNegative | None = None
    expected_route: RouteId | None = None
    decision_reason: str | None = None
    target_model: str | None = None
    second_score: float | None = None
    config_source: str | None = None
    config_sha256: Sha256Hex | None = None
    route_bank_sha256: Sha256Hex | None = None
    prompt_tokens: Count | None = None
    completion_tokens: Count | None = None
    format: FormatSignals | None = None


class ReviewCluster(msgspec.Struct, frozen=True, kw_only=True):
    """Candidates that share a reason and their safe metadata (route, top and second
    route, match source, index and text hash, and from RouteScores 1.2 the decision's own
    reason); ``key`` is a hash of those."""

    key: str
    reason: str
    size: Count
    route_id: RouteId | None = None
    top_route_id: RouteId | None = None
    second_route_id: RouteId | None = None
    match_source: str | None = None
    match_index: int | None = None
    match_text_sha256: Sha256Hex | None = None
    example_request_ids: tuple[RequestId, ...] = ()
    decision_reason: str | None = None


class DriftInput(Event, frozen=True, kw_only=True):
    """Internal (``drift.inputs.v1``): a decision or an observation the drift detector
    needs, re-keyed by a subject it feeds (a target model, a route, or ``*``: all
    routing), so that each instance of a scaled-out detector owns whole subjects (Kafka
    Streams' repartition). An event feeding several subjects is here once per subject;
    ``event_id`` comes from the source's and the subject's, so a copy published again
    after a crash is the same event. Read only by drift detectors; never the prompt."""

    scope: Literal["model", "route"]
    subject: str
    decision: RouteDecided | None = None
    observation: CompletionObserved | None = None
    # For a model: which of the observation's answers are the subject's (indexes into its
    # unserved attempts, in order, then the served answer).
    answers: tuple[int, ...] = ()

    @property
    def subject_key(self) -> str:
        return f"{self.scope}:{self.subject}"


class RouteScores(Event, frozen=True, kw_only=True):
    """The scorer's figures over one rolling window (1.1 adds ``window_seconds`` and
    what follows: the window's overall figures and the review clusters; 1.2 the review
    candidates' and clusters' decision metadata)."""

    schema_version: str = "1.2"
    window_start: UtcDatetime
    window_end: UtcDatetime
    config_sha256: Sha256Hex | None = None
    routes: tuple[RouteScore, ...] = ()
    layers: tuple[LayerScore, ...] = ()
    recommendations: tuple[ThresholdRecommendation, ...] = ()
    review_candidates: tuple[ReviewCandidate, ...] = ()
    window_seconds: NonNegative = 0.0
    decisions: Count = 0
    outcomes: Count = 0
    correct: Count = 0
    accuracy: Probability | None = None
    low_confidence_rate: Probability | None = None
    p95_decision_latency_ms: NonNegative | None = None
    review_clusters: tuple[ReviewCluster, ...] = ()


class ReplayRequested(Event, frozen=True, kw_only=True):
    """Ask the replay worker for a report. Configs and inputs are named, never located:
    a name is a file in the worker's config or input directory. 1.1 adds the names; the
    1.0 path fields are read for their base name only."""

    schema_version: str = "1.1"
    replay_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128,
                                           pattern=r"^[A-Za-z0-9._:-]+$")]
    # A dataset (labelled, the eval format) or a captures directory, by name.
    dataset: str = ""
    dataset_sha256: Sha256Hex | None = None
    config_path: str | None = None
    previous_config_path: str | None = None
    baselines: tuple[str, ...] = ()
    requested_by: Label | None = None
    kind: Literal["replay", "shadow"] = "replay"
    source: Literal["dataset", "captures"] = "dataset"
    # Config names; None: the worker's current config (config), none (candidate, previous).
    config: str | None = None
    candidate: str | None = None
    previous: str | None = None
    # At most this many cases, sampled by id (0: all).
    limit: Count = 100
    # Shadow reports: the window of decisions compared, ending now.
    window_s: NonNegative = 3600.0


class ReplayCompleted(Event, frozen=True, kw_only=True):
    """One per ReplayRequested. 1.1 names the report file in the worker's report
    directory with its sha256 and the receipt's run hash (``report_path`` stays empty)."""

    schema_version: str = "1.1"
    replay_id: str
    status: Literal["ok", "failed"]
    items: Count = 0
    accuracy: Probability | None = None
    baseline_accuracy: dict[str, float] = {}
    changed_routes: Count = 0
    config_sha256: Sha256Hex | None = None
    dataset_sha256: Sha256Hex | None = None
    report_path: str | None = None
    error: str | None = None
    kind: Literal["replay", "shadow"] = "replay"
    report_name: str | None = None
    report_sha256: Sha256Hex | None = None
    run_hash: Sha256Hex | None = None
    candidate_accuracy: Probability | None = None
    drift_status: Literal["ok", "warn", "alert"] | None = None
    # Shadow reports: the share of live decisions the shadow config agreed with.
    agreement: Probability | None = None


class RouteBankPublished(Event, frozen=True, kw_only=True):
    collection: str
    route_bank_sha256: Sha256Hex
    encoder: str
    utterances: Count
    routes: tuple[RouteId, ...]
    config_sha256: Sha256Hex | None = None


class ReviewMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    content: str


class PromptReviewCaptured(Event, frozen=True, kw_only=True):
    """Opt-in only, on its own topic: the redacted prompt for human review.

    1.1: only the latest user message is captured, cut to a configured length;
    ``original_chars`` and ``truncated`` say how long it was and whether it was cut.
    """

    schema_version: str = "1.1"
    request_id: RequestId
    route_id: RouteId
    reason: DecisionReason
    mode: Literal["redacted"] = "redacted"
    messages: tuple[ReviewMessage, ...] = ()
    redactions: Count = 0
    original_chars: Count | None = None
    truncated: bool = False


class DeadLetter(Event, frozen=True, kw_only=True):
    """An undecodable or unprocessable message, kept whole so nothing is lost.

    ``original`` and header values are ``bytes``: msgspec writes them as base64 in JSON.
    1.1: an original too large for the topic is stored whole on the dead-lettering
    service's disk, named by its sha256; ``original`` is then its first bytes
    (``truncated``), and ``original_size`` and ``original_sha256`` describe the whole.
    """

    schema_version: str = "1.1"
    original: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    key: bytes | None = None
    source_topic: str
    partition: int
    offset: int
    consumer_group: str | None = None
    service: str | None = None
    error_kind: str
    error: str
    original_size: Count | None = None
    original_sha256: Sha256Hex | None = None
    truncated: bool = False


EVENT_TYPES: tuple[type[Event], ...] = (
    RouteDecided,
    ShadowDecided,
    CompletionObserved,
    OutcomeReported,
    DriftAlert,
    DriftInput,
    RouteScores,
    ReplayRequested,
    ReplayCompleted,
    RouteBankPublished,
    PromptReviewCaptured,
    DeadLetter,
)
