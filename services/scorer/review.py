"""Review candidates offline and the packet an outside reviewer gets: metadata only.

Review capture files (the gateway's opt-in ``raw_local`` directory, or redacted
``PromptReviewCaptured`` events saved as JSON lines) are read for whether a candidate has
local evidence, whether it was cut, and its length; the text is read only for a packet
asked to include it, only from a ``raw_local`` directory, and only into a local file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from routemesh.contracts import ReviewCandidate, ReviewCluster
from routemesh.services.runtime.captures import Capture, CaptureMode
from routemesh.services.runtime.files import numbered_rows
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
    # Per expected route: the outcomes that name it and whose request's capture holds
    # text, which `routemesh learn` can learn from (with a prompt directory only).
    learnable: dict[str, int] = {}
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
    learnable: Counter[str] = Counter()
    for request in requests:
        count += 1
        outcomes += request.outcome is not None
        said = request.outcome
        if said is not None and said.expected_route is not None and captures is not None:
            capture = captures.get(said.request_id)
            learnable[said.expected_route] += capture is not None and bool(capture.chars)
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
                        includes_prompt_text=include_text,
                        learnable=dict(sorted((r, n) for r, n in learnable.items() if n)))


def render_markdown(report: ReviewReport) -> str:
    lines = [
        "# routemesh review candidates", "",
        f"{report.candidates} candidates among {report.requests} requests "
        f"({report.outcomes} with an outcome); the first {len(report.rows)} below.", "",
        "## Clusters (largest first)", "",
        "| size | reason | decided by | route | top | second | match source | index | "
        "match text sha256 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {c.size} | {c.reason} | {c.decision_reason or ''} | {c.route_id} | "
              f"{c.top_route_id} | "
              f"{c.second_route_id} | {c.match_source or ''} | "
              f"{'' if c.match_index is None else c.match_index} | "
              f"{(c.match_text_sha256 or '')[:12]} |" for c in report.clusters]
    lines += ["", "## Candidates", "",
              "| request | reasons | decided by | route | model | score | second | threshold "
              "| margin | status | tokens in/out | evidence |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report.rows:
        c, e = row.candidate, row.evidence
        evidence = "" if e is None else "none" if not e.present else (
            f"{e.mode}, {e.chars} chars{', cut' if e.truncated else ''}")
        tokens = "" if c.prompt_tokens is None and c.completion_tokens is None else \
            f"{_int(c.prompt_tokens)}/{_int(c.completion_tokens)}"
        lines.append(f"| {c.request_id} | {', '.join(c.reasons)} | {c.decision_reason or ''} | "
                     f"{c.route_id} | {c.target_model or ''} | {_num(c.score)} | "
                     f"{_num(c.second_score)} | {_num(c.threshold)} | {_num(c.margin)} | "
                     f"{_int(c.upstream_status)} | {tokens} | {evidence} |")
    return "\n".join(lines) + "\n"


def _int(value: int | None) -> str:
    return "" if value is None else str(value)


# -- an outside reviewer's answer ----------------------------------------------------------

Judgement = Literal["right_route", "wrong_route", "unsure"]


class ReviewAnswer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One line of a reviewer's answer to a packet (JSON lines, one candidate each):
    whether the route served was right, the route it should have been, and a short note.
    ``routemesh review schema`` prints this as JSON Schema."""

    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    verdict: Judgement
    suggested_route: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    note: Annotated[str, msgspec.Meta(max_length=1000)] = ""


def read_answers(path: Path) -> list[ReviewAnswer]:
    """Every answer of a reviewer's file; ValueError names the first line that is not
    one (``file:line: why``), and an answer given twice."""
    answers: list[ReviewAnswer] = []
    seen: dict[str, int] = {}
    for number, answer in numbered_rows(path, msgspec.json.Decoder(ReviewAnswer)):
        if answer.verdict == "wrong_route" and answer.suggested_route is None:
            raise ValueError(f"{path.name}:{number}: a wrong_route verdict needs "
                             "suggested_route")
        if answer.request_id in seen:
            raise ValueError(f"{path.name}:{number}: {answer.request_id} was answered on "
                             f"line {seen[answer.request_id]} already")
        seen[answer.request_id] = number
        answers.append(answer)
    return answers


class AnswerSummary(msgspec.Struct, frozen=True, kw_only=True):
    answers: int
    verdicts: dict[str, int]
    # Candidate route -> verdict -> count (routes from the packet; "unknown" without it).
    by_route: dict[str, dict[str, int]]
    # "served -> suggested" -> count, for wrong_route answers.
    suggested: dict[str, int]
    # Answers for request ids the packet does not hold, and packet rows left unanswered.
    not_in_packet: list[str] = []
    unanswered: int = 0


def summarize_answers(answers: list[ReviewAnswer],
                      packet: ReviewReport | None) -> AnswerSummary:
    routes = {row.candidate.request_id: row.candidate.route_id or "unknown"
              for row in packet.rows} if packet is not None else {}
    by_route: dict[str, Counter[str]] = {}
    suggested: Counter[str] = Counter()
    for answer in answers:
        route = routes.get(answer.request_id, "unknown")
        by_route.setdefault(route, Counter())[answer.verdict] += 1
        if answer.verdict == "wrong_route":
            suggested[f"{route} -> {answer.suggested_route}"] += 1
    answered = {a.request_id for a in answers}
    return AnswerSummary(
        answers=len(answers),
        verdicts=dict(sorted(Counter(a.verdict for a in answers).items())),
        by_route={r: dict(sorted(c.items())) for r, c in sorted(by_route.items())},
        suggested=dict(suggested.most_common()),
        not_in_packet=sorted(answered - set(routes)) if packet is not None else [],
        unanswered=len(set(routes) - answered),
    )


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"
