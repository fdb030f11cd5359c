"""Receipts: what a report was made from and by, and a run hash that any copy of the
report can be checked against; and the drift of a report's headline figures from the
previous report on the same input set."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Literal

import msgspec

from routemesh.contracts.events import utc_now
from routemesh.services.replay_worker.replay import ReplayResult, SystemFigures
from routemesh.services.router import EvalReport, file_sha256
from routemesh.services.runtime.files import pretty_json, write_atomically

Status = Literal["ok", "warn", "alert"]


class Bands(msgspec.Struct, frozen=True, kw_only=True):
    """A headline figure that moves by more than ``warn`` of its last value warns; by
    more than ``alert``, alerts."""

    warn: float = 0.20
    alert: float = 0.50


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    code_version: str
    git_commit: str | None = None
    created_at: datetime
    run_hash: str
    input_set_sha256: str
    input_files_sha256: str
    # By config system: sha256 of the validated config, of its files, and of its bank.
    configs: dict[str, dict[str, str | None]] = {}
    counts: dict[str, int] = {}
    validation_passed: bool
    problems: list[str] = []
    # Output file name (beside the receipt) -> sha256; filled in the receipt file only.
    outputs: dict[str, str] = {}
    # An earlier receipt had the same code and inputs and another run hash.
    deterministic_violation: bool = False


class FigureChange(msgspec.Struct, frozen=True, kw_only=True):
    figure: str
    before: float
    after: float
    relative: float | None
    status: Status


class Drift(msgspec.Struct, frozen=True, kw_only=True):
    status: Status
    # The report compared with (None: the first on this input set).
    against_run_hash: str | None = None
    against_created_at: datetime | None = None
    changes: list[FigureChange] = []
    new_errors: list[str] = []
    # The same code, configs, bank and input set as the report compared with, and yet
    # another run hash: the replay is not deterministic, and no figure of it is evidence.
    deterministic_violation: bool = False


class Report(ReplayResult, frozen=True, kw_only=True):
    receipt: Receipt
    drift: Drift


def code_version() -> tuple[str, str | None]:
    """The package version, and the git commit when known (the image sets
    ROUTEMESH_GIT_COMMIT; a checkout answers ``git rev-parse``)."""
    version = importlib.metadata.version("routemesh")
    commit = os.environ.get("ROUTEMESH_GIT_COMMIT") or None
    if commit is None and Path(".git").exists():
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=True, timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return version, commit


def run_hash(result: ReplayResult) -> str:
    """sha256 of what was run and what it decided: the inputs' hashes, every case's row
    and every system's figures. Cases are in id order and figures are computed in that
    order, so the same inputs listed in any order give the same hash; when, where, by
    which version, and the input file's name and bytes (their order) are left out (the
    receipt says those)."""
    inputs = msgspec.structs.replace(result.inputs, name="", files_sha256="")
    material = msgspec.json.encode({
        "inputs": inputs, "labelled": result.labelled, "systems": result.systems,
        "deltas": result.deltas, "cases": sorted(result.cases, key=lambda c: c.id),
        "errors": result.errors,
    }, order="sorted")
    return hashlib.sha256(material).hexdigest()


def validate(result: ReplayResult) -> list[str]:
    """What makes the report unfit as evidence."""
    problems = []
    if not result.cases:
        problems.append("no cases")
    configs = [s for s in result.systems if s.kind == "config"]
    for system in configs:
        if system.cases != sum(1 for c in result.cases if system.name in c.decisions):
            problems.append(f"{system.name}: not every case was decided")
    if result.errors.get("embedding_error"):
        problems.append(f"{result.errors['embedding_error']} decisions had no embedding")
    return problems


def receipt_for(result: ReplayResult) -> Receipt:
    version, commit = code_version()
    problems = validate(result)
    return Receipt(
        code_version=version, git_commit=commit, created_at=result.created_at,
        run_hash=run_hash(result), input_set_sha256=result.inputs.input_set_sha256,
        input_files_sha256=result.inputs.files_sha256,
        configs={name: {"config_sha256": c.config_sha256, "files_sha256": c.files_sha256,
                        "route_bank_sha256": c.route_bank_sha256}
                 for name, c in result.inputs.configs.items()},
        counts={"cases_read": result.inputs.cases_read, "cases": len(result.cases),
                "decided": sum(bool(c.decisions) for c in result.cases)},
        validation_passed=not problems, problems=problems,
    )


def eval_receipt(report: EvalReport, config_files_sha256: str, input_set: str,
                 earlier: Receipt | None) -> Receipt:
    """The receipt of a `routemesh eval` run, in the replay's form: the code, the inputs'
    hashes, and a run hash over what was decided and the figures (timings left out: they
    are not the same twice); flagged when ``earlier`` had the same code and inputs and
    another run hash."""
    material = msgspec.json.encode({
        "sha256": report.sha256, "decisions": report.decision_sha256,
        "accuracy": report.accuracy, "macro_f1": report.macro_f1,
        "baselines": {name: b.accuracy for name, b in report.baselines.items()},
        "items": report.items, "excluded_trained": report.excluded_trained,
    }, order="sorted")
    version, commit = code_version()
    receipt = Receipt(
        code_version=version, git_commit=commit, created_at=utc_now(),
        run_hash=hashlib.sha256(material).hexdigest(), input_set_sha256=input_set,
        input_files_sha256=report.sha256.dataset,
        configs={"current": {"config_sha256": report.sha256.config,
                             "files_sha256": config_files_sha256,
                             "route_bank_sha256": report.sha256.route_bank}},
        counts={"items": report.items, "excluded_trained": report.excluded_trained},
        validation_passed=True,
    )
    return msgspec.structs.replace(receipt,
                                   deterministic_violation=_not_repeated(receipt, earlier))


def read_receipt(path: Path) -> Receipt | None:
    """The receipt at ``path``, or None when there is none (or it is unreadable)."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=Receipt)
    except (OSError, msgspec.DecodeError):
        return None


def headline(systems: Iterable[SystemFigures]) -> dict[str, float]:
    figures: dict[str, float] = {}
    for s in systems:
        for name in ("accuracy", "macro_f1", "agreement", "estimated_cost"):
            value = getattr(s, name)
            if value is not None:
                figures[f"{s.name}.{name}"] = value
    return figures


def _status(relative: float | None, before: float, after: float, bands: Bands) -> Status:
    if relative is None:
        return "ok" if before == after else "warn"
    return "alert" if relative > bands.alert else "warn" if relative > bands.warn else "ok"


def _not_repeated(receipt: Receipt, earlier: Receipt | None) -> bool:
    """The same code and inputs as ``earlier``, and another run hash: a deterministic run
    answers the same inputs alike, so one of the two is no evidence."""
    return earlier is not None and receipt.run_hash != earlier.run_hash and (
        (receipt.code_version, receipt.git_commit, receipt.input_set_sha256,
         receipt.configs, receipt.counts)
        == (earlier.code_version, earlier.git_commit, earlier.input_set_sha256,
            earlier.configs, earlier.counts))


def drift(result: ReplayResult, previous: Report | None, bands: Bands | None = None,
          receipt: Receipt | None = None) -> Drift:
    """``ok``, ``warn`` or ``alert`` against the previous report on the same input set:
    the worst of its figures' moves and of new error classes. An alert too when the
    previous report had the same inputs (``receipt``'s) and another run hash."""
    bands = bands or Bands()
    if previous is None:
        return Drift(status="ok")
    before, after = headline(previous.systems), headline(result.systems)
    changes = []
    for figure in sorted(before.keys() & after.keys()):
        b, a = before[figure], after[figure]
        relative = abs(a - b) / abs(b) if b else None
        changes.append(FigureChange(figure=figure, before=b, after=a, relative=relative,
                                    status=_status(relative, b, a, bands)))
    new_errors = sorted(set(result.errors) - set(previous.errors))
    violation = receipt is not None and _not_repeated(receipt, previous.receipt)
    statuses = [c.status for c in changes] + (["warn"] if new_errors else []) + \
        (["alert"] if violation else [])
    worst: Status = "alert" if "alert" in statuses else "warn" if "warn" in statuses else "ok"
    return Drift(status=worst, against_run_hash=previous.receipt.run_hash,
                 against_created_at=previous.receipt.created_at, changes=changes,
                 new_errors=new_errors, deterministic_violation=violation)


_REPORT = msgspec.json.Decoder(Report)


def read_report(path: Path) -> Report:
    return _REPORT.decode(path.read_bytes())


def previous_report(history: Path, input_set_sha256: str) -> Report | None:
    """The newest report in ``history`` on the same input set."""
    found: list[Report] = []
    for path in history.glob("*.json"):
        try:
            report = read_report(path)
        except (msgspec.DecodeError, OSError):
            continue
        if report.receipt.input_set_sha256 == input_set_sha256:
            found.append(report)
    return max(found, key=lambda r: r.created_at, default=None)


def finish(result: ReplayResult, history: Path | None, bands: Bands | None = None) -> Report:
    """The result with its receipt, and its drift against ``history``."""
    previous = previous_report(history, result.inputs.input_set_sha256) \
        if history is not None and history.is_dir() else None
    receipt = receipt_for(result)
    return Report(**msgspec.structs.asdict(result), receipt=receipt,
                  drift=drift(result, previous, bands, receipt))


def write_outputs(report: Report, json_path: Path | None, markdown_path: Path | None,
                  markdown: str) -> Path | None:
    """The report files, and a receipt beside the JSON one (``<name>.receipt.json``)
    with every output's sha256. Returns the receipt's path."""
    outputs: dict[str, str] = {}
    for path, data in ((markdown_path, markdown.encode()), (json_path, pretty_json(report))):
        if path is None:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)
        outputs[path.name] = hashlib.sha256(data).hexdigest()
    if json_path is None:
        return None
    receipt_path = json_path.with_name(json_path.stem + ".receipt.json")
    receipt = msgspec.structs.replace(report.receipt, outputs=outputs)
    write_atomically(receipt_path, pretty_json(receipt))
    return receipt_path


def verify(receipt_path: Path) -> list[str]:
    """What does not hold of a receipt: an output whose bytes changed, a report whose
    recomputed run hash differs. Empty when it all holds."""
    receipt = msgspec.json.decode(receipt_path.read_bytes(), type=Receipt)
    problems = []
    report_path = None
    for name, sha in receipt.outputs.items():
        path = receipt_path.parent / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        if file_sha256(path) != sha:
            problems.append(f"{name}: sha256 differs from the receipt's")
        if name.endswith(".json"):
            report_path = path
    if report_path is None:
        return [*problems, "the receipt lists no JSON report"]
    try:
        report = read_report(report_path)
    except msgspec.DecodeError as exc:
        return [*problems, f"{report_path.name}: not a replay report ({exc})"]
    result = ReplayResult(**{f: getattr(report, f) for f in ReplayResult.__struct_fields__})
    recomputed = run_hash(result)
    if recomputed != receipt.run_hash:
        problems.append(f"run hash {recomputed[:12]}… recomputed from the report differs "
                        f"from the receipt's {receipt.run_hash[:12]}…")
    if report.receipt.run_hash != receipt.run_hash:
        problems.append("the report's own receipt names another run hash")
    return problems
