"""Run a labelled dataset through a router and baselines; report accuracy and more."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import msgspec

from routemesh.contracts import RouteDecided
from routemesh.services.router.bank import text_sha256
from routemesh.services.router.cascade import Router
from routemesh.services.router.config import LoadedConfig, canonical_sha256
from routemesh.services.router.datasets import DatasetError, EvalItem
from routemesh.services.router.encoders import DenseEncoder
from routemesh.services.router.factory import load_router
from routemesh.services.router.scoring import Reliability, reliability
from routemesh.services.runtime.files import pretty_json
from routemesh.services.runtime.stats import Percentiles

# An eval where more than this share of items never reached routing (an override or a
# passthrough decided them) measures the requests' model names, not the router.
UNROUTED_WARN_SHARE = 0.05


class RouteFigures(msgspec.Struct, frozen=True, kw_only=True):
    precision: float
    recall: float
    f1: float
    support: int


class LayerFigures(msgspec.Struct, frozen=True, kw_only=True):
    capture_rate: float
    accuracy: float
    decisions: int


class Scores(msgspec.Struct, frozen=True, kw_only=True):
    """How one system's decisions compare with the labels."""

    accuracy: float
    items: int
    macro_f1: float
    per_route: dict[str, RouteFigures]
    # Rows: expected route; columns: predicted.
    confusion: dict[str, dict[str, int]]
    layers: dict[str, LayerFigures]
    reasons: dict[str, int]
    # Share of items an override or passthrough decided (the requested model), not routing.
    unrouted_share: float
    route_share: dict[str, float]
    latency_ms: Percentiles
    # Of the items the semantic layer scored: its top route's probability against how
    # often that route was right, per probability bucket, and the expected calibration
    # error (the count-weighted mean gap).
    reliability: list[Reliability] = []
    calibration_error: float | None = None


class Baseline(msgspec.Struct, frozen=True, kw_only=True):
    accuracy: float
    route_share: dict[str, float]


class Mistake(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    expected: str
    predicted: str
    reason: str
    score: float | None


class Hashes(msgspec.Struct, frozen=True, kw_only=True):
    config: str
    route_bank: str | None
    dataset: str


class EvalReport(Scores, frozen=True, kw_only=True):
    baselines: dict[str, Baseline]
    mistakes: list[Mistake]
    sha256: Hashes
    config_source: str
    # Item id -> the route decided.
    decisions: dict[str, str]
    # Items left out because the route model was trained on them (bank build --train).
    excluded_trained: int = 0
    # Item id -> decision_sha256 of its decision: what a replay of the set must reproduce.
    decision_sha256: dict[str, str] = {}


class _DecisionKey(msgspec.Struct, frozen=True, array_like=True):
    route_id: str
    target_model: str
    reason: str
    layer: str
    second_route_id: str | None
    match_source: str | None
    match_index: int | None
    match_text_sha256: str | None


def decision_sha256(decision: RouteDecided) -> str:
    """What a decision decided and on which evidence, hashed: equal for the same request
    decided twice by the same config and bank (timings, ids and scores' last bits left
    out)."""
    key = msgspec.convert(decision, _DecisionKey, from_attributes=True)
    return hashlib.sha256(msgspec.json.encode(key)).hexdigest()


def score(items: list[EvalItem], decisions: list[RouteDecided], routes: list[str]) -> Scores:
    """Accuracy, per-route precision/recall/F1, confusion, per-layer figures, route share."""
    expected = [item.route for item in items]
    predicted = [d.route_id for d in decisions]
    correct = [e == p for e, p in zip(expected, predicted, strict=True)]
    labels = sorted(set(routes) | set(expected) | set(predicted))
    confusion = {e: {p: 0 for p in labels} for e in labels}
    for e, p in zip(expected, predicted, strict=True):
        confusion[e][p] += 1
    per_route = {}
    for label in labels:
        tp = confusion[label][label]
        fp = sum(confusion[e][label] for e in labels) - tp
        fn = sum(confusion[label].values()) - tp
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_route[label] = RouteFigures(precision=precision, recall=recall, f1=f1,
                                        support=tp + fn)
    by_layer: dict[str, list[bool]] = defaultdict(list)
    reasons = Counter(d.reason for d in decisions)
    for decision, ok in zip(decisions, correct, strict=True):
        by_layer[decision.layer].append(ok)
    layers = {
        layer: LayerFigures(capture_rate=len(oks) / len(items), accuracy=sum(oks) / len(oks),
                            decisions=len(oks))
        for layer, oks in sorted(by_layer.items())
    }
    share = Counter(predicted)
    supported = [f.f1 for label, f in per_route.items() if f.support]
    semantic = [(attempt.confidence, attempt.selected_route == item.route)
                for item, decision in zip(items, decisions, strict=True)
                for attempt in decision.attempts
                if attempt.layer == "semantic" and attempt.confidence is not None]
    table, ece = reliability([c for c, _ in semantic], [ok for _, ok in semantic])
    return Scores(
        accuracy=sum(correct) / len(items),
        items=len(items),
        macro_f1=sum(supported) / len(supported) if supported else 0.0,
        per_route=per_route,
        confusion=confusion,
        layers=layers,
        reasons=dict(sorted(reasons.items())),
        unrouted_share=(reasons["override"] + reasons["passthrough"]) / len(items),
        route_share={label: share.get(label, 0) / len(items) for label in labels},
        latency_ms=Percentiles.of([d.decision_latency_ms for d in decisions]),
        reliability=table if semantic else [],
        calibration_error=ece,
    )


def evaluate(
    router: Router,
    items: list[EvalItem],
    dataset_sha256: str,
    progress: Callable[[Iterable[EvalItem]], Iterable[EvalItem]] = lambda it: it,
) -> EvalReport:
    routes = [route.id for route in router.config.routes]
    trained = set(router.matcher.model.train_text_sha256) if router.matcher else set()
    mode = router.config.semantic.match_text
    kept = [i for i in items if text_sha256(i.request.match_text(mode)) not in trained]
    excluded, items = len(items) - len(kept), kept
    if not items:
        raise DatasetError("every item of the dataset trained the route model: nothing left "
                           "to evaluate")
    decisions = [router.decide(item.request, item.id) for item in progress(items)]
    scores = score(items, decisions, routes)
    baselines: dict[str, Baseline] = {}
    for route in routes:
        target = router.config.route(route).target_model
        always = [
            RouteDecided(
                request_id=item.id, route_id=route, target_model=target,
                reason="default", layer="fallback",
            )
            for item in items
        ]
        baselines[f"always-{route}"] = _baseline(score(items, always, routes))
    rules_only = [router.decide_rules_only(item.request, item.id) for item in items]
    baselines["rules-only"] = _baseline(score(items, rules_only, routes))
    return EvalReport(
        **msgspec.structs.asdict(scores),
        baselines=baselines,
        mistakes=[
            Mistake(id=item.id, expected=item.route, predicted=d.route_id, reason=d.reason,
                    score=d.score)
            for item, d in zip(items, decisions, strict=True)
            if d.route_id != item.route
        ],
        sha256=Hashes(config=router.config_sha256, route_bank=router.route_bank_sha256,
                      dataset=dataset_sha256),
        config_source=router.loaded.source,
        excluded_trained=excluded,
        decisions={item.id: d.route_id for item, d in zip(items, decisions, strict=True)},
        decision_sha256={item.id: decision_sha256(d)
                         for item, d in zip(items, decisions, strict=True)},
    )


def _baseline(scores: Scores) -> Baseline:
    return Baseline(accuracy=scores.accuracy, route_share=scores.route_share)


def unrouted_warning(report: Scores) -> str | None:
    """Why this eval says little about routing, if it does."""
    share = report.unrouted_share
    if share <= UNROUTED_WARN_SHARE:
        return None
    return (
        f"{share:.0%} of the items were decided by an override or passthrough (the model "
        "their request named), not by routing: this eval measures little about the "
        "router. Leave `model` out of the dataset rows (or use auto), and check that the "
        "config does not map it elsewhere."
    )


def render_markdown(report: EvalReport) -> str:
    lines = [
        "# routemesh eval report",
        "",
        f"- config: `{report.config_source}` sha256 `{report.sha256.config}`",
        f"- route bank sha256 `{report.sha256.route_bank}`",
        f"- dataset sha256 `{report.sha256.dataset}` ({report.items} items)",
        "",
        f"**Accuracy: {report.accuracy:.3f}** (macro-F1 {report.macro_f1:.3f})",
        "",
        "| system | accuracy |",
        "| --- | --- |",
        f"| routemesh | {report.accuracy:.3f} |",
    ]
    lines += [f"| {name} | {b.accuracy:.3f} |" for name, b in report.baselines.items()]
    lines += ["", "## Per route", "", "| route | precision | recall | F1 | support | share |",
              "| --- | --- | --- | --- | --- | --- |"]
    for route, m in report.per_route.items():
        lines.append(
            f"| {route} | {m.precision:.3f} | {m.recall:.3f} | {m.f1:.3f} | "
            f"{m.support} | {report.route_share.get(route, 0):.3f} |"
        )
    lines += ["", "## Per layer", "", "| layer | capture rate | accuracy | decisions |",
              "| --- | --- | --- | --- |"]
    for layer, f in report.layers.items():
        lines.append(f"| {layer} | {f.capture_rate:.3f} | {f.accuracy:.3f} | {f.decisions} |")
    labels = list(report.confusion)
    lines += ["", "## Confusion (rows: expected, columns: predicted)", "",
              "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for expected in labels:
        row = report.confusion[expected]
        lines.append(f"| {expected} | " + " | ".join(str(row[p]) for p in labels) + " |")
    if report.reliability:
        lines += ["", "## Calibration (semantic layer)", "",
                  f"Expected calibration error: {report.calibration_error:.3f}", "",
                  "| probability | items | mean probability | accuracy |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {b.low:.1f}-{b.high:.1f} | {b.count} | {b.mean_confidence:.3f} | "
                  f"{b.accuracy:.3f} |" for b in report.reliability if b.count]
    latency = report.latency_ms
    lines += ["", f"Decision latency ms: p50 {latency.p50:.2f}, p95 {latency.p95:.2f}, "
              f"p99 {latency.p99:.2f}", ""]
    if report.excluded_trained:
        lines += [f"{report.excluded_trained} items were left out: the route model was "
                  "trained on them.", ""]
    return "\n".join(lines)


def write_reports(report: EvalReport, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_bytes(pretty_json(report))
    md_path.write_text(render_markdown(report), encoding="utf-8")
    return json_path, md_path


SCORINGS: tuple[tuple[str, str, str], ...] = (
    ("logistic head", "logistic", "centroid"),
    ("centroid", "none", "centroid"),
    ("top-k mean", "none", "topk_mean"),
    ("max", "none", "max"),
)


def compare(loaded: LoadedConfig, encoder: DenseEncoder, items: list[EvalItem],
            dataset_sha256: str) -> list[tuple[str, EvalReport]]:
    """The same config and dataset with each scoring: the head, and each aggregation
    (banks built in memory with one encoder)."""
    reports = []
    for name, head, aggregation in SCORINGS:
        semantic = msgspec.structs.replace(loaded.config.semantic, head=head,
                                           aggregation=aggregation)
        config = msgspec.structs.replace(loaded.config, semantic=semantic)
        variant = LoadedConfig(config, loaded.source, canonical_sha256(config),
                               loaded.utterances, loaded.files)
        router = load_router(variant, encoder=encoder)
        reports.append((name, evaluate(router, items, dataset_sha256)))
    return reports
