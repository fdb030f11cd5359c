"""A replay report as Markdown, and the compact summary a terminal shows."""

from __future__ import annotations

from routemesh.services.replay_worker.receipt import Report
from routemesh.services.runtime.files import reasons_text

FLIPS_SHOWN = 50


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_rows(report: Report) -> list[tuple[str, str, str, str, str]]:
    """(system, accuracy, macro-F1, agreement with recorded, estimated cost)."""
    return [(s.name, _f(s.accuracy), _f(s.macro_f1), _f(s.agreement), _f(s.estimated_cost, 4))
            for s in report.systems]


def render_markdown(report: Report) -> str:
    inputs, receipt = report.inputs, report.receipt
    lines = [
        "# routemesh replay report", "",
        f"- input: {inputs.source} `{inputs.name}` sha256 `{inputs.files_sha256}`; "
        f"{len(report.cases)} of {inputs.cases_read} cases"
        + (" (all)" if inputs.limit == 0 else f" (limit {inputs.limit})"),
        f"- input set sha256 `{inputs.input_set_sha256}` (order-independent)",
    ]
    lines += [f"- skipped in `{file}`: {reasons_text(reasons)}"
              for file, reasons in inputs.skipped_lines.items()]
    lines += [f"- {name}: `{c.name}` config sha256 `{c.config_sha256}`, files "
              f"`{c.files_sha256}`, bank `{c.route_bank_sha256}`"
              for name, c in inputs.configs.items()]
    if not report.labelled:
        lines += ["", "No labels: the figures are agreement and deltas, not accuracy. "
                  "Recorded routes are evidence of drift, never ground truth."]
    lines += ["", "## Systems", "",
              "| system | accuracy | macro-F1 | agreement with recorded | estimated cost |",
              "| --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(report)]
    lines += ["", "## Route mix", ""]
    routes = sorted({r for s in report.systems for r in s.route_mix})
    lines += ["| system | " + " | ".join(routes) + " |", "|---" * (len(routes) + 1) + "|"]
    lines += [f"| {s.name} | " + " | ".join(_f(s.route_mix.get(r, 0.0)) for r in routes) + " |"
              for s in report.systems]
    for s in report.systems:
        if s.kind != "config" or not s.per_route:
            continue
        lines += ["", f"## Per route: {s.name}", "",
                  "| route | precision | recall | F1 | support |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r} | {m.precision:.3f} | {m.recall:.3f} | {m.f1:.3f} | {m.support} |"
                  for r, m in s.per_route.items()]
    for d in report.deltas:
        lines += ["", f"## {d.before} → {d.after}", "",
                  f"{d.cases} cases: route changed {d.route_changed}, reason changed "
                  f"{d.reason_changed}, target model changed {d.target_changed}, match "
                  f"source changed {d.match_source_changed}."]
        if d.flips:
            lines += ["", "| id | text sha256 | before | after | label | verdict |",
                      "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {f.id} | `{f.text_sha256[:16]}` | {f.before} | {f.after} | "
                      f"{f.label or '-'} | {f.verdict} |" for f in d.flips[:FLIPS_SHOWN]]
            if len(d.flips) > FLIPS_SHOWN:
                lines.append(f"\n{len(d.flips) - FLIPS_SHOWN} more in the JSON report.")
    drift = report.drift
    lines += ["", f"## Drift against the previous report: **{drift.status}**", ""]
    if drift.against_run_hash is None:
        lines.append("First report on this input set.")
    else:
        lines.append(f"Against run `{drift.against_run_hash}` of {drift.against_created_at}.")
        if drift.deterministic_violation:
            lines.append("**deterministic_violation**: that run had the same code, configs, "
                         "bank and input set, and another run hash (alert).")
        moved = [c for c in drift.changes if c.status != "ok"]
        lines += [f"- {c.figure}: {c.before:.4f} → {c.after:.4f} ({c.status})" for c in moved]
        lines += [f"- new error class: {e} (warn)" for e in drift.new_errors]
    if report.errors:
        lines += ["", "Errors: " + ", ".join(f"{k} {v}" for k, v in report.errors.items())]
    lines += ["", "## Receipt", "",
              f"- run hash `{receipt.run_hash}`",
              f"- routemesh {receipt.code_version}, commit {receipt.git_commit or 'unknown'}",
              f"- created {receipt.created_at.isoformat()}",
              f"- validation {'passed' if receipt.validation_passed else 'FAILED'}"
              + ("".join(f"; {p}" for p in receipt.problems)),
              "- counts: " + ", ".join(f"{k} {v}" for k, v in receipt.counts.items()), ""]
    return "\n".join(lines)
