"""The topic registry: every topic, what it carries, how it is keyed and partitioned."""

from __future__ import annotations

from dataclasses import dataclass

from routemesh.contracts.events import (
    CompletionObserved,
    DeadLetter,
    DriftAlert,
    DriftInput,
    Event,
    OutcomeReported,
    PromptReviewCaptured,
    ReplayCompleted,
    ReplayRequested,
    RouteBankPublished,
    RouteDecided,
    RouteScores,
    ShadowDecided,
)

DEFAULT_PREFIX = "routemesh."


@dataclass(frozen=True, slots=True)
class Topic:
    """A topic without its deployment prefix; ``name(prefix)`` gives the Kafka name."""

    suffix: str
    events: tuple[type[Event], ...]
    partitions: int
    key_field: str | None
    description: str
    # A service's state, key by key: the broker keeps the newest record of each key.
    compacted: bool = False

    def name(self, prefix: str = DEFAULT_PREFIX) -> str:
        return f"{prefix}{self.suffix}"

    def key_for(self, event: Event) -> bytes | None:
        if self.key_field is None:
            return None
        value = getattr(event, self.key_field, None)
        return None if value is None else str(value).encode()


ROUTE_DECISIONS = Topic(
    "route.decisions.v1", (RouteDecided,), 6, "request_id",
    "Exactly one RouteDecided per request: the route served, why, and the evidence. "
    "Metadata only. Shadow decisions are on route.shadow_decisions.v1.",
)
ROUTE_SHADOW_DECISIONS = Topic(
    "route.shadow_decisions.v1", (ShadowDecided,), 6, "request_id",
    "One ShadowDecided per request decided again with the gateway's shadow config: what a "
    "candidate config would have done, never served, beside what the live one did.",
)
LLM_OBSERVATIONS = Topic(
    "llm.observations.v1", (CompletionObserved,), 6, "request_id",
    "One CompletionObserved per request: upstream status, timings, tokens, escalation.",
)
ROUTE_OUTCOMES = Topic(
    "route.outcomes.v1", (OutcomeReported,), 6, "request_id",
    "Outcomes reported by callers: completed, correct route, quality score.",
)
DRIFT_ALERTS = Topic(
    "drift.alerts.v1", (DriftAlert,), 1, None,
    "A DriftAlert whenever a drift signal changes severity.",
)
ROUTE_SCORES = Topic(
    "route.scores.v1", (RouteScores,), 1, None,
    "Periodic accuracy, threshold recommendations and review candidates.",
)
REPLAY_REQUESTS = Topic(
    # Partitions for replay workers to share: each request is answered by one of them.
    "replay.requests.v1", (ReplayRequested,), 6, "replay_id",
    "Requests to replay an eval set or captured samples through a config.",
)
REPLAY_RESULTS = Topic(
    "replay.results.v1", (ReplayCompleted,), 1, "replay_id",
    "The outcome of each replay, with the report's location and input hashes.",
)
ROUTEBANK_CHANGES = Topic(
    "routebank.changes.v1", (RouteBankPublished,), 1, None,
    "A RouteBankPublished whenever a route bank is (re)built; gateways reload on it.",
)
PROMPTS_REVIEW = Topic(
    "prompts.review.v1", (PromptReviewCaptured,), 1, "request_id",
    "Opt-in only: redacted prompts captured for human review.",
)
DLQ = Topic(
    "dlq.v1", (DeadLetter,), 1, None,
    "Messages a consumer could not decode or process, with the original bytes and error.",
)

SCORER_CHANGELOG = Topic(
    # Partition p holds the state of the scorer's input partition p, so it moves with it.
    "scorer.changelog.v1", (), ROUTE_DECISIONS.partitions, None,
    "Internal: the scorer's counts and pending joins per input partition, key by key "
    "(Kafka Streams' changelog). Read only by scorers; not an event contract.",
    compacted=True,
)

DRIFT_INPUTS = Topic(
    # Partitions for drift detectors to share: each owns the subjects keyed to its own.
    "drift.inputs.v1", (DriftInput,), 6, "subject_key",
    "Internal: the decisions and observations a scaled-out drift detector judges, once "
    "per subject they feed, keyed by subject (a repartition). Read only by drift "
    "detectors.",
)
DRIFT_CHANGELOG = Topic(
    # Partition p holds the state of the subjects of drift.inputs.v1's partition p.
    "drift.changelog.v1", (), DRIFT_INPUTS.partitions, None,
    "Internal: a scaled-out drift detector's windows and verdicts per subject, key by "
    "key (Kafka Streams' changelog). Read only by drift detectors; not an event contract.",
    compacted=True,
)

TOPICS: tuple[Topic, ...] = (
    ROUTE_DECISIONS,
    ROUTE_SHADOW_DECISIONS,
    LLM_OBSERVATIONS,
    ROUTE_OUTCOMES,
    DRIFT_ALERTS,
    ROUTE_SCORES,
    REPLAY_REQUESTS,
    REPLAY_RESULTS,
    ROUTEBANK_CHANGES,
    PROMPTS_REVIEW,
    DLQ,
    DRIFT_INPUTS,
)
# Topics that hold a service's state rather than events: made with the others, described
# nowhere as a contract.
STATE_TOPICS: tuple[Topic, ...] = (SCORER_CHANGELOG, DRIFT_CHANGELOG)


def topic_for_event(event_type: type[Event]) -> Topic:
    for topic in TOPICS:
        if event_type in topic.events:
            return topic
    raise LookupError(f"no topic carries {event_type.__name__}")


def topic_by_suffix(suffix: str) -> Topic:
    for topic in TOPICS:
        if topic.suffix == suffix:
            return topic
    known = ", ".join(t.suffix for t in TOPICS)
    raise LookupError(f"unknown topic {suffix!r}; known topics: {known}")
