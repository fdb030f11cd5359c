"""`routemesh tune`: fit a config's thresholds and margin (and its scoring: head,
aggregation, dense weight) on a training split of a labelled set, and report the
held-back split before and after.

Each item is decided once per scoring with the config as it is; what other thresholds
and margins would have decided follows from the semantic layer's top route, score and
margin without encoding again (the top route does not depend on thresholds). A route's
threshold only decides between that route and the fallback for the items it tops, so
each route is fitted on its own, on the same 0.05 grid the live advice uses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from routemesh.services.router import LoadedConfig, Router, RoutingConfig, load_router
from routemesh.services.router.config import canonical_sha256
from routemesh.services.router.datasets import EvalItem
from routemesh.services.router.encoders import CachingEncoder, DenseEncoder
from routemesh.services.scorer.patch import ConfigChange
from routemesh.services.scorer.views import semantic_of, view

GRID_STEP = 0.05
MARGINS = (0.0, 0.02, 0.05, 0.1)
DENSE_WEIGHTS = (0.6, 0.8, 1.0)
# A normal tune moves a threshold at most this far from where it is; --aggressive
# searches the whole grid.
NORMAL_REACH = 0.25
# Input tokens are estimated from characters where the set has no token counts.
CHARS_PER_TOKEN = 4.0


@dataclass(frozen=True)
class Case:
    id: str
    label: str
    # The route decided without the semantic layer (a rule, an override), else None.
    fixed: str | None
    top: str | None = None
    score: float = 0.0
    margin: float | None = None
    # Fell back although score and margin passed: the evidence floor, which no
    # threshold or margin moves.
    floor_blocked: bool = False
    input_tokens: float = 0.0


@dataclass(frozen=True)
class Setting:
    thresholds: dict[str, float]
    margin: float

    def route(self, case: Case, default: str) -> str:
        if case.fixed is not None:
            return case.fixed
        assert case.top is not None
        accepted = (case.score >= self.thresholds[case.top] - 1e-9
                    and (case.margin is None or case.margin >= self.margin - 1e-9)
                    and not case.floor_blocked)
        return case.top if accepted else default


@dataclass(frozen=True)
class Figures:
    accuracy: float
    cost: float
    items: int


@dataclass(frozen=True)
class Prices:
    # Route -> (price per 1k input tokens, per 1k output tokens).
    per_route: dict[str, tuple[float, float]]
    # The answer length assumed for every item (a labelled set has no answers).
    output_tokens: float

    @classmethod
    def of(cls, config: RoutingConfig, output_tokens: float) -> Prices:
        return cls({r.id: (r.price_per_1k_input_tokens, r.price_per_1k_output_tokens)
                    for r in config.routes}, output_tokens)

    def cost(self, route: str, case: Case) -> float:
        per_input, per_output = self.per_route.get(route, (0.0, 0.0))
        return (case.input_tokens * per_input + self.output_tokens * per_output) / 1000


def measure(cases: Sequence[Case], setting: Setting, default: str, prices: Prices) -> Figures:
    if not cases:
        return Figures(0.0, 0.0, 0)
    routes = [setting.route(c, default) for c in cases]
    right = sum(r == c.label for r, c in zip(routes, cases, strict=True))
    cost = sum(prices.cost(r, c) for r, c in zip(routes, cases, strict=True))
    return Figures(right / len(cases), cost / len(cases), len(cases))


def cases_of(router: Router, items: Sequence[EvalItem]) -> list[Case]:
    found = []
    for item in items:
        decision = view(router.decide(item.request, item.id))
        semantic = semantic_of(decision)
        tokens = item.request.prompt_chars / CHARS_PER_TOKEN
        if semantic is None:
            found.append(Case(item.id, item.route, decision.route_id, input_tokens=tokens))
            continue
        passed = semantic.score >= semantic.threshold and (
            decision.margin is None or decision.required_margin is None
            or decision.margin >= decision.required_margin)
        found.append(Case(item.id, item.route, None, semantic.top_route, semantic.score,
                          decision.margin, passed and not semantic.accepted, tokens))
    return found


def split(items: Sequence[EvalItem], held_share: float = 0.5
          ) -> tuple[list[EvalItem], list[EvalItem]]:
    """Training and held-back items by a hash of each id: the same split every run,
    whatever the file's order."""
    train: list[EvalItem] = []
    held: list[EvalItem] = []
    for item in items:
        digest = int(hashlib.sha256(item.id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if digest < held_share else train).append(item)
    return train, held


def _grid(current: float, aggressive: bool) -> list[float]:
    values = [round(GRID_STEP * k, 2) for k in range(1, round(1 / GRID_STEP))]
    if not aggressive:
        values = [v for v in values if abs(v - current) <= NORMAL_REACH + 1e-9]
    return sorted(set(values) | {current}, key=lambda v: (abs(v - current), v))


def fit_thresholds(cases: Sequence[Case], current: dict[str, float], margin: float,
                   default: str, aggressive: bool, min_samples: int = 1) -> dict[str, float]:
    """Each route's threshold that makes the most training items right (the nearest to
    the current one on a tie); a route topping fewer than ``min_samples`` training items
    keeps its threshold."""
    fitted = dict(current)
    for route, threshold in current.items():
        mine = [c for c in cases if c.fixed is None and c.top == route]
        if len(mine) < min_samples:
            continue
        best, best_right = threshold, -1
        for candidate in _grid(threshold, aggressive):
            setting = Setting({**fitted, route: candidate}, margin)
            right = sum(setting.route(c, default) == c.label for c in mine)
            if right > best_right:
                best, best_right = candidate, right
        fitted[route] = best
    return fitted


def cheapen(cases: Sequence[Case], setting: Setting, origin: dict[str, float], default: str,
            prices: Prices, min_accuracy: float, aggressive: bool) -> Setting:
    """From ``setting``, move one threshold at a time to the grid value (within reach of
    its ``origin`` unless aggressive) that saves the most cost while training accuracy
    stays at or above ``min_accuracy``, until no move saves any. The whole grid, not the
    next step: a step that moves no item would stop a search that looks one step ahead."""
    current = setting
    figures = measure(cases, current, default, prices)
    while True:
        best: tuple[Setting, Figures] | None = None
        for route in current.thresholds:
            for value in _grid(origin[route], aggressive):
                trial = Setting({**current.thresholds, route: value}, current.margin)
                measured = measure(cases, trial, default, prices)
                if measured.accuracy >= min_accuracy and measured.cost < figures.cost - 1e-12 \
                        and (best is None or measured.cost < best[1].cost - 1e-12):
                    best = (trial, measured)
        if best is None:
            return current
        current, figures = best


@dataclass(frozen=True)
class Scoring:
    head: str
    aggregation: str
    dense_weight: float

    @property
    def name(self) -> str:
        if self.head == "logistic":
            return f"logistic head, dense weight {self.dense_weight}"
        return f"{self.aggregation}, dense weight {self.dense_weight}"


@dataclass
class TuneResult:
    before: Setting
    after: Setting
    scoring_before: Scoring
    scoring_after: Scoring
    train_before: Figures
    train_after: Figures
    held_before: Figures
    held_after: Figures
    objective: str
    min_accuracy: float | None
    tried: list[tuple[str, Figures]] = field(default_factory=list)

    @property
    def change(self) -> ConfigChange:
        thresholds = {r: t for r, t in self.after.thresholds.items()
                      if abs(t - self.before.thresholds[r]) > 1e-9}
        semantic: dict[str, object] = {}
        for key in ("head", "aggregation", "dense_weight"):
            if getattr(self.scoring_after, key) != getattr(self.scoring_before, key):
                semantic[key] = getattr(self.scoring_after, key)
        margin = None if abs(self.after.margin - self.before.margin) < 1e-9 \
            else self.after.margin
        return ConfigChange(thresholds, margin, semantic)

    @property
    def safe(self) -> bool:
        """Whether applying is allowed: held-back accuracy does not drop (cost: it stays
        at or above the minimum and the cost does not rise)."""
        if self.objective == "cost":
            assert self.min_accuracy is not None
            return (self.held_after.accuracy >= self.min_accuracy
                    and self.held_after.cost <= self.held_before.cost + 1e-12)
        return self.held_after.accuracy >= self.held_before.accuracy - 1e-12


def _variant(loaded: LoadedConfig, scoring: Scoring) -> LoadedConfig:
    semantic = msgspec.structs.replace(loaded.config.semantic, head=scoring.head,
                                       aggregation=scoring.aggregation,
                                       dense_weight=scoring.dense_weight)
    config = msgspec.structs.replace(loaded.config, semantic=semantic)
    return LoadedConfig(config, loaded.source, canonical_sha256(config), loaded.utterances,
                        loaded.files)


def tune(loaded: LoadedConfig, encoder: DenseEncoder, items: Sequence[EvalItem], *,
         objective: str = "accuracy", min_accuracy: float | None = None,
         aggressive: bool = False, search_scoring: bool = False, output_tokens: float = 200.0,
         min_samples: int = 10,
         progress: Callable[[str], None] = lambda message: None) -> TuneResult:
    config = loaded.config
    default = config.default_route
    prices = Prices.of(config, output_tokens)
    current = Setting({r.id: r.threshold for r in config.routes}, config.margin)
    semantic = config.semantic
    scoring_now = Scoring(semantic.head, semantic.aggregation, semantic.dense_weight)
    scorings = [scoring_now]
    if search_scoring:
        for head, aggregation in (("logistic", semantic.aggregation), ("none", "centroid"),
                                  ("none", "topk_mean"), ("none", "max")):
            for weight in DENSE_WEIGHTS:
                candidate = Scoring(head, aggregation, weight)
                if candidate not in scorings:
                    scorings.append(candidate)
    train_items, held_items = split(items)
    # Every scoring tried sees the same texts: each is encoded once.
    cached = CachingEncoder(encoder, None)
    best: tuple[tuple[float, ...], Scoring, Setting, list[Case], list[Case]] | None = None
    baseline: tuple[list[Case], list[Case]] | None = None
    tried = []
    for scoring in scorings:
        progress(f"deciding with {scoring.name}")
        router = load_router(_variant(loaded, scoring), encoder=cached)
        train, held = cases_of(router, train_items), cases_of(router, held_items)
        if scoring == scoring_now:
            baseline = (train, held)
        for margin in sorted(set(MARGINS) | {current.margin}):
            fitted = Setting(fit_thresholds(train, current.thresholds, margin, default,
                                            aggressive, min_samples), margin)
            if objective == "cost":
                assert min_accuracy is not None
                fitted = cheapen(train, fitted, current.thresholds, default, prices,
                                 min_accuracy, aggressive)
            figures = measure(train, fitted, default, prices)
            # Prefer: more accurate (cost: cheaper while accurate enough), then the
            # current scoring and margin, then the smaller change.
            is_current = (scoring == scoring_now, margin == current.margin)
            key = ((figures.accuracy >= (min_accuracy or 0), -figures.cost, figures.accuracy)
                   if objective == "cost" else (figures.accuracy,)) + is_current
            if best is None or key > best[0]:
                best = (key, scoring, fitted, train, held)
        tried.append((scoring.name, measure(held, current, default, prices)))
    assert best is not None
    assert baseline is not None
    _, scoring_after, after, train_after, held_after = best
    train_before, held_before = baseline
    return TuneResult(
        before=current, after=after, scoring_before=scoring_now, scoring_after=scoring_after,
        train_before=measure(train_before, current, default, prices),
        train_after=measure(train_after, after, default, prices),
        held_before=measure(held_before, current, default, prices),
        held_after=measure(held_after, after, default, prices),
        objective=objective, min_accuracy=min_accuracy, tried=tried,
    )
