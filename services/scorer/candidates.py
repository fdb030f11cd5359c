"""Review candidates: the requests a human should look at, picked and grouped by metadata
alone. A candidate lists every reason it qualifies for; candidates that share a reason
and their safe metadata (route, top and second route, match source, index and text
hash) form a cluster, and a cluster that keeps growing is stronger evidence than a
one-off."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from routemesh.contracts import ReviewCandidate, ReviewCluster
from routemesh.services.scorer.views import (
    LedgerDecision,
    LedgerObservation,
    LedgerOutcome,
    final_right,
    semantic_of,
)

REASONS = ("low_confidence", "embedding_error", "route_error", "upstream_non_2xx",
           "near_threshold", "near_margin", "slow", "wrong_route")


@dataclass(frozen=True)
class CandidatePolicy:
    # |score - threshold| below this is near the threshold.
    threshold_band: float = 0.05
    # |margin - required margin| below this is near the margin.
    margin_band: float = 0.02
    # An answer (or the caller's task) that took longer than this is slow.
    slow_ms: float = 30_000.0


def reasons(decision: LedgerDecision, observation: LedgerObservation | None,
            outcome: LedgerOutcome | None, policy: CandidatePolicy) -> tuple[str, ...]:
    found = []
    if decision.reason == "low_confidence":
        found.append("low_confidence")
    if decision.reason == "embedding_error":
        found.append("embedding_error")
    if observation is not None and observation.error_class is not None:
        found.append("route_error")
    if observation is not None and observation.upstream_status is not None \
            and not 200 <= observation.upstream_status < 300:
        found.append("upstream_non_2xx")
    if decision.score is not None and decision.threshold is not None \
            and abs(decision.score - decision.threshold) < policy.threshold_band:
        found.append("near_threshold")
    if decision.margin is not None and decision.required_margin is not None \
            and abs(decision.margin - decision.required_margin) < policy.margin_band:
        found.append("near_margin")
    duration = observation.duration_ms if observation is not None else 0.0
    if outcome is not None and outcome.completion_time_s is not None:
        duration = max(duration, outcome.completion_time_s * 1000)
    if duration > policy.slow_ms:
        found.append("slow")
    if outcome is not None and final_right(decision, outcome) is False:
        found.append("wrong_route")
    return tuple(found)


def cluster_key(reason: str, c: ReviewCandidate) -> str:
    parts = (reason, c.decision_reason, c.route_id, c.top_route_id, c.second_route_id,
             c.match_source, c.match_index, c.match_text_sha256)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def candidate(decision: LedgerDecision, observation: LedgerObservation | None,
              outcome: LedgerOutcome | None, policy: CandidatePolicy) -> ReviewCandidate | None:
    found = reasons(decision, observation, outcome, policy)
    if not found:
        return None
    semantic = semantic_of(decision)
    drafted = ReviewCandidate(
        request_id=decision.request_id, reasons=found, cluster="",
        route_id=decision.route_id, score=decision.score, occurred_at=decision.occurred_at,
        second_route_id=decision.second_route_id,
        top_route_id=semantic.top_route if semantic else None,
        match_source=decision.match_source, match_index=decision.match_index,
        match_text_sha256=decision.match_text_sha256, threshold=decision.threshold,
        margin=decision.margin,
        upstream_status=observation.upstream_status if observation else None,
        duration_ms=observation.duration_ms if observation else None,
        expected_route=outcome.expected_route if outcome else None,
        decision_reason=decision.reason, target_model=decision.target_model,
        second_score=decision.second_score, config_source=decision.config_source,
        config_sha256=decision.config_sha256, route_bank_sha256=decision.route_bank_sha256,
        prompt_tokens=observation.prompt_tokens if observation else None,
        completion_tokens=observation.completion_tokens if observation else None,
        format=decision.format,
    )
    return msgspec.structs.replace(drafted, cluster=cluster_key(found[0], drafted))


def clusters(found: Iterable[ReviewCandidate], limit: int = 50,
             examples: int = 5) -> list[ReviewCluster]:
    """One cluster per reason and metadata, largest first."""
    groups: dict[tuple[str, str], list[ReviewCandidate]] = defaultdict(list)
    for c in found:
        for reason in c.reasons:
            groups[(reason, cluster_key(reason, c))].append(c)
    ranked = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    return [
        ReviewCluster(
            key=key, reason=reason, size=len(members), route_id=first.route_id,
            top_route_id=first.top_route_id, second_route_id=first.second_route_id,
            match_source=first.match_source, match_index=first.match_index,
            match_text_sha256=first.match_text_sha256,
            example_request_ids=tuple(m.request_id for m in members[:examples]),
            decision_reason=first.decision_reason,
        )
        for (reason, key), members in ranked[:limit]
        for first in members[:1]
    ]


def ranked(found: Iterable[ReviewCandidate], limit: int) -> list[ReviewCandidate]:
    """Candidates in the largest clusters first, then those with the most reasons, then
    the newest."""
    found = list(found)
    sizes: dict[str, int] = defaultdict(int)
    for c in found:
        sizes[c.cluster] += 1
    return sorted(found, key=lambda c: (-sizes[c.cluster], -len(c.reasons),
                                        -(c.occurred_at.timestamp() if c.occurred_at else 0),
                                        c.request_id))[:limit]
