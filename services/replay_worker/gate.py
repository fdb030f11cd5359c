"""The change gate: the evidence a config change needs, in one report, and a verdict.

The new config is replayed on a labelled (held-out) set next to the config it replaces
and the baselines; it fails when it is worse than the old one by more than a tolerance,
or worse than any single baseline. Recent traffic from the audit and a rollback line
come with it."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

import msgspec

from routemesh.services.replay_worker.cases import Case
from routemesh.services.replay_worker.receipt import Report
from routemesh.services.router import LoadedConfig
from routemesh.services.runtime.files import Skipped
from routemesh.services.runtime.stats import shares


class AuditSummary(msgspec.Struct, frozen=True, kw_only=True):
    since: datetime | None
    requests: int
    route_mix: dict[str, float]
    reasons: dict[str, int]
    estimated_cost: float
    # Served by config (sha256 -> requests): a change mid-window shows here.
    configs: dict[str, int]
    # Lines of the audit files that were not read: file name -> reason -> count.
    skipped_lines: dict[str, dict[str, int]] = {}


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    passed: bool
    reasons: list[str]
    tolerance: float
    new_accuracy: float
    old_accuracy: float
    best_baseline: str
    best_baseline_accuracy: float


class GateReport(msgspec.Struct, frozen=True, kw_only=True):
    verdict: Verdict
    rollback: str
    replay: Report
    audit: AuditSummary | None = None


def audit_summary(cases: list[Case], priced_by: LoadedConfig, since: datetime | None,
                  skipped: Skipped | None = None) -> AuditSummary:
    recorded = [c.recorded for c in cases if c.recorded is not None]
    prices = {r.id: r for r in priced_by.config.routes}
    cost = 0.0
    for case in cases:
        route = prices.get(case.recorded.route_id) if case.recorded else None
        if route is not None:
            cost += case.cost(route)
    return AuditSummary(
        since=since, requests=len(recorded),
        route_mix=shares(r.route_id for r in recorded),
        reasons=dict(sorted(Counter(r.reason or "unknown" for r in recorded).items())),
        estimated_cost=round(cost, 9),
        configs=dict(Counter(r.config_sha256 or "unknown" for r in recorded)),
        skipped_lines=skipped.by_file() if skipped is not None else {},
    )


def verdict(report: Report, tolerance: float) -> Verdict:
    systems = {s.name: s for s in report.systems}
    new, old = systems["candidate"].accuracy, systems["current"].accuracy
    if new is None or old is None:
        raise ValueError("the gate needs a labelled dataset")
    baselines = [s for s in report.systems if s.kind in ("always", "rules")]
    best = max(baselines, key=lambda s: s.accuracy or 0.0)
    reasons = []
    if new < old - tolerance:
        reasons.append(f"accuracy {new:.3f} is below the old config's {old:.3f} by more "
                       f"than the tolerance {tolerance:.3f}")
    if new < (best.accuracy or 0.0):
        reasons.append(f"accuracy {new:.3f} is below the {best.name} baseline's "
                       f"{best.accuracy:.3f}")
    if not report.receipt.validation_passed:
        reasons.append("the replay did not validate: " + "; ".join(report.receipt.problems))
    return Verdict(passed=not reasons, reasons=reasons, tolerance=tolerance,
                   new_accuracy=new, old_accuracy=old, best_baseline=best.name,
                   best_baseline_accuracy=best.accuracy or 0.0)


def rollback_line(report: Report) -> str:
    old = report.inputs.configs["current"]
    return (f"rollback: the previous config is {old.name} (config sha256 "
            f"{old.config_sha256}, files sha256 {old.files_sha256}); restore that file "
            "as the gateway's ROUTEMESH_ROUTER_CONFIG (or `helm rollback` the release) "
            "and the gateways reload it")


def render_markdown(gate: GateReport, replay_markdown: str) -> str:
    v = gate.verdict
    lines = [
        "# routemesh change gate", "",
        f"**{'PASS' if v.passed else 'FAIL'}**: new {v.new_accuracy:.3f}, old "
        f"{v.old_accuracy:.3f} (tolerance {v.tolerance:.3f}), best baseline "
        f"{v.best_baseline} {v.best_baseline_accuracy:.3f}.",
    ]
    lines += [f"- {reason}" for reason in v.reasons]
    lines += ["", f"Drift against the previous gate on this dataset: "
              f"**{gate.replay.drift.status}**; run hash `{gate.replay.receipt.run_hash}`.",
              "", gate.rollback, ""]
    audit = gate.audit
    if audit is not None:
        lines += ["## Recent traffic (audit)", "",
                  f"{audit.requests} requests since {audit.since or 'the first record'}; "
                  f"estimated cost {audit.estimated_cost:.4f}.", "",
                  "| route | share |", "| --- | --- |"]
        lines += [f"| {r} | {s:.3f} |" for r, s in audit.route_mix.items()]
        lines += ["", "Reasons: " + ", ".join(f"{k} {n}" for k, n in audit.reasons.items()),
                  ""]
    return "\n".join(lines) + "\n" + replay_markdown.replace("# routemesh replay report",
                                                             "## The replay", 1)
