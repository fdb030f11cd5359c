"""What a replay runs: cases from a labelled dataset, a captures directory or an audit
period. A case carries the request when its text is known (datasets, captures), the
label when there is one (datasets only), and what the mesh decided when it was recorded
(captures, audit): evidence of drift, never ground truth."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import msgspec

from routemesh.services.router import Route, RouteRequest, load_dataset
from routemesh.services.router.datasets import EvalItem
from routemesh.services.runtime.captures import read_captures
from routemesh.services.runtime.files import Skipped, decoded_lines, files_sha256, jsonl_files


class Recorded(msgspec.Struct, frozen=True, kw_only=True):
    """What the mesh decided for a case when it served it."""

    route_id: str
    reason: str | None = None
    target_model: str | None = None
    match_source: str | None = None
    config_sha256: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class Case:
    id: str
    text_sha256: str
    chars: int
    request: RouteRequest | None = None
    label: str | None = None
    recorded: Recorded | None = None

    @property
    def input_tokens(self) -> int:
        """Tokens the request cost: recorded by the upstream, else about four characters
        a token."""
        if self.recorded is not None and self.recorded.prompt_tokens is not None:
            return self.recorded.prompt_tokens
        return math.ceil(self.chars / 4)

    @property
    def output_tokens(self) -> int:
        if self.recorded is not None and self.recorded.completion_tokens is not None:
            return self.recorded.completion_tokens
        return 0

    def cost(self, route: Route) -> float:
        """What serving the case on ``route`` costs at its prices."""
        return (self.input_tokens * route.price_per_1k_input_tokens
                + self.output_tokens * route.price_per_1k_output_tokens) / 1000

    def key(self) -> bytes:
        """What identifies the case in the input set's hash."""
        return msgspec.json.encode([self.id, self.text_sha256, self.label])


def from_dataset(path: Path) -> list[Case]:
    return from_items(load_dataset(path))


def from_items(items: Iterable[EvalItem]) -> list[Case]:
    """Cases of a labelled set already read (``eval`` reads it once for both)."""
    return [Case(id=item.id, text_sha256=item.request.prompt_sha256,
                 chars=item.request.prompt_chars, request=item.request, label=item.route)
            for item in items]


def from_captures(directory: Path, skipped: Skipped | None = None) -> list[Case]:
    cases = []
    for request_id, capture in sorted(read_captures(directory, with_text=True,
                                                    skipped=skipped).items()):
        request = RouteRequest.from_text(capture.text or "")
        recorded = Recorded(route_id=capture.route_id, reason=capture.reason) \
            if capture.route_id else None
        cases.append(Case(id=request_id, text_sha256=request.prompt_sha256,
                          chars=request.prompt_chars, request=request, recorded=recorded))
    return cases


class _Decision(msgspec.Struct, kw_only=True):
    occurred_at: datetime
    route_id: str
    reason: str | None = None
    target_model: str | None = None
    match_source: str | None = None
    config_sha256: str | None = None
    prompt_sha256: str = ""
    prompt_chars: int = 0


class _Observation(msgspec.Struct, kw_only=True):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _AuditLine(msgspec.Struct, kw_only=True):
    """The fields of an audit record a replay reads (the audit writer owns the format)."""

    request_id: str
    decision: _Decision | None = None
    observation: _Observation | None = None


def from_audit(directory: Path, since: datetime | None = None,
               skipped: Skipped | None = None) -> list[Case]:
    """Every request of the audit files (compressed days too) with a decision at or after
    ``since``: what was decided, and the tokens the upstream reported. No text: the audit
    never has it. Lines that are no audit record are counted in ``skipped``."""
    decisions: dict[str, _Decision] = {}
    observations: dict[str, _Observation] = {}
    for row in decoded_lines(directory, msgspec.json.Decoder(_AuditLine), skipped):
        if row.decision is not None:
            decisions[row.request_id] = row.decision
        if row.observation is not None:
            observations[row.request_id] = row.observation
    cases = []
    for request_id, d in sorted(decisions.items()):
        if since is not None and d.occurred_at < since:
            continue
        o = observations.get(request_id)
        cases.append(Case(id=request_id, text_sha256=d.prompt_sha256, chars=d.prompt_chars,
                          recorded=Recorded(
                              route_id=d.route_id, reason=d.reason,
                              target_model=d.target_model, match_source=d.match_source,
                              config_sha256=d.config_sha256,
                              prompt_tokens=o.prompt_tokens if o else None,
                              completion_tokens=o.completion_tokens if o else None)))
    return cases


def with_recorded(cases: list[Case], recorded: Iterable[Case]) -> list[Case]:
    """``cases`` with what the audit recorded for the same request ids (captures replayed
    next to their audit records: tokens and the decision served)."""
    known = {case.id: case.recorded for case in recorded if case.recorded is not None}
    return [Case(id=c.id, text_sha256=c.text_sha256, chars=c.chars, request=c.request,
                 label=c.label, recorded=known.get(c.id, c.recorded)) for c in cases]


def hashed_order(case_id: str) -> bytes:
    """A sort key that puts ids in an order fixed by their hash, not by how the input
    listed them: a sample (or a split) of them is the same on every run."""
    return hashlib.sha256(case_id.encode()).digest()


def sample(cases: list[Case], limit: int) -> list[Case]:
    """At most ``limit`` cases (0: all), chosen by a hash of their id: the same cases
    whatever order the input lists them in, and in that order by id."""
    ordered = sorted(cases, key=lambda c: c.id)
    if limit == 0 or len(ordered) <= limit:
        return ordered
    chosen = sorted(ordered, key=lambda c: hashed_order(c.id))[:limit]
    return sorted(chosen, key=lambda c: c.id)


def input_set_sha256(cases: Iterable[Case]) -> str:
    """The input set's hash, independent of the order it was listed in."""
    digest = hashlib.sha256()
    for key in sorted(case.key() for case in cases):
        digest.update(key + b"\n")
    return digest.hexdigest()


def load_input(source: str, path: Path, *, audit_dir: Path | None = None,
               since: datetime | None = None,
               skipped: Skipped | None = None) -> tuple[list[Case], str]:
    """The cases of ``path`` (a dataset file, a captures or an audit directory), with
    what ``audit_dir`` recorded for the same requests, and the sha256 of what was read.
    The lines of either directory that could not be read are counted in ``skipped``."""
    if source == "dataset":
        cases = from_dataset(path)
    elif source == "captures":
        cases = from_captures(path, skipped)
    else:
        cases = from_audit(path, since, skipped)
    if audit_dir is not None and source != "audit":
        cases = with_recorded(cases, from_audit(audit_dir, skipped=skipped))
    return cases, stored_sha256(path)


def stored_sha256(path: Path) -> str:
    """sha256 of a file's bytes, or of a directory's JSON-lines files (compressed ones
    too) by name."""
    return files_sha256([path] if path.is_file() else jsonl_files(path),
                        named=True)
