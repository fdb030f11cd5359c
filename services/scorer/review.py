"""Review candidates offline and the packet an outside reviewer gets: metadata only.

Review capture files (the gateway's opt-in ``raw_local`` directory, or redacted
``PromptReviewCaptured`` events saved as JSON lines) are read for whether a candidate has
local evidence, whether it was cut, and its length; the text is read only for a packet
asked to include it, only from a ``raw_local`` directory, and only into a local file.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import msgspec

from routemesh.contracts import ReviewCandidate, ReviewCluster
from routemesh.services.runtime.captures import Capture, CaptureMode
from routemesh.services.scorer.candidates import CandidatePolicy, candidate, clusters, ranked
from routemesh.services.scorer.views import LedgerDecision, LedgerObservation, LedgerOutcome


class Evidence(msgspec.Struct, frozen=True, kw_only=True):
    """Whether a candidate has local review evidence; never its text."""

    present: bool
    mode: CaptureMode | None = None
    truncated: bool | None = None
    chars: int | None = None


class CandidateRow(msgspec.Struct, frozen=True, kw_only=True):
    candidate: ReviewCandidate
    evidence: Evidence | None = None
    # Only in a packet made with --include-prompt-text from a raw_local directory.
    prompt_text: str | None = None


class ReviewReport(msgspec.Struct, frozen=True, kw_only=True):
    generated_at: datetime
    requests: int
    outcomes: int
    candidates: int
    rows: tuple[CandidateRow, ...]
    clusters: tuple[ReviewCluster, ...]
    includes_prompt_text: bool = False
    # Lines of the audit and capture files that were not read: file -> reason -> count.
    skipped_lines: dict[str, dict[str, int]] = {}


class Request(msgspec.Struct, kw_only=True):
    decision: LedgerDecision | None = None
    observation: LedgerObservation | None = None
    outcome: LedgerOutcome | None = None


def review(requests: Iterable[Request], policy: CandidatePolicy, limit: int,
           captures: dict[str, Capture] | None, now: datetime,
           include_text: bool = False) -> ReviewReport:
    found = []
    count = outcomes = 0
    for request in requests:
        count += 1
        outcomes += request.outcome is not None
        if request.decision is None:
            continue
        made = candidate(request.decision, request.observation, request.outcome, policy)
        if made is not None:
            found.append(made)
    rows = []
    for c in ranked(found, limit):
        capture = captures.get(c.request_id) if captures is not None else None
        evidence = None if captures is None else Evidence(present=False) if capture is None \
            else Evidence(present=True, mode=capture.mode, truncated=capture.truncated,
                          chars=capture.chars)
        rows.append(CandidateRow(
            candidate=c, evidence=evidence,
            prompt_text=capture.text if include_text and capture is not None else None))
    return ReviewReport(generated_at=now, requests=count, outcomes=outcomes,
                        candidates=len(found), rows=tuple(rows), clusters=tuple(clusters(found)),
                        includes_prompt_text=include_text)


def render_markdown(report: ReviewReport) -> str:
    lines = [
        "# routemesh review candidates", "",
        f"{report.candidates} candidates among {report.requests} requests "
        f"({report.outcomes} with an outcome); the first {len(report.rows)} below.", "",
        "## Clusters (largest first)", "",
        "| size | reason | route | top | second | match source | index | match text sha256 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {c.size} | {c.reason} | {c.route_id} | {c.top_route_id} | "
              f"{c.second_route_id} | {c.match_source or ''} | "
              f"{'' if c.match_index is None else c.match_index} | "
              f"{(c.match_text_sha256 or '')[:12]} |" for c in report.clusters]
    lines += ["", "## Candidates", "",
              "| request | reasons | route | score | threshold | margin | status | evidence |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report.rows:
        c, e = row.candidate, row.evidence
        evidence = "" if e is None else "none" if not e.present else (
            f"{e.mode}, {e.chars} chars{', cut' if e.truncated else ''}")
        lines.append(f"| {c.request_id} | {', '.join(c.reasons)} | {c.route_id} | "
                     f"{_num(c.score)} | {_num(c.threshold)} | {_num(c.margin)} | "
                     f"{'' if c.upstream_status is None else c.upstream_status} | {evidence} |")
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"
