"""Routes that learn from reviewed traffic (``routemesh learn``).

The training set is the operator's own review: outcomes that name an ``expected_route``
(from the audit files), joined by request id with the text the review capture holds
(``raw_local`` or redacted excerpts, never text from anywhere else). It is guarded before
anything is fitted: one item per text, labels that are routes, a cap per route relative to
its utterances (one busy route cannot drown the others), and a refusal of the whole batch
when too many labels contradict the bank's own utterances (a poisoned or mislabelled
batch). The route model fitted on the bank plus the batch is gated against the bank that
serves now, on held-back folds of the batch and on the shipped eval set; only a model that
passes is written, and the receipt says what it learned from and how to undo it."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import msgspec
import numpy as np
from qdrant_client import QdrantClient

from routemesh.contracts.events import utc_now
from routemesh.services.replay_worker.cases import hashed_order
from routemesh.services.replay_worker.samples import MAX_CHARS
from routemesh.services.router import (
    LoadedConfig,
    Router,
    RouteRequest,
    load_config,
    load_dataset,
    load_router,
)
from routemesh.services.router.bank import (
    RouteBank,
    TrainingSet,
    default_collection,
    fit_model,
    load_snapshot,
    route_bank_sha256,
    store_model,
    text_sha256,
)
from routemesh.services.router.datasets import EvalItem
from routemesh.services.router.scoring import RouteModel
from routemesh.services.runtime.captures import Capture, read_captures
from routemesh.services.runtime.files import (
    Skipped,
    decoded_lines,
    pretty_json,
    write_atomically,
)


@dataclass(frozen=True)
class LearnPolicy:
    # A route learns at most this many items per utterance it has (and at least
    # ``min_cap``): reviewed traffic refines a route, it does not replace what it says.
    cap_per_utterance: float = 1.0
    min_cap: int = 5
    # An item contradicts the bank when none of its ``contradiction_neighbours`` nearest
    # utterances is of its label and the nearest is closer (cosine) than any of its
    # label's by ``contradiction_margin``. Chosen on the shipped eval sets: their true
    # labels almost never contradict, a batch with its labels rotated mostly does
    # (`tests/services/replay_worker/test_learn.py` keeps both sides).
    contradiction_neighbours: int = 5
    contradiction_margin: float = 0.15
    # A batch with more contradicting items than this share is refused whole.
    max_contradiction_rate: float = 0.25
    # Held-back folds of the batch the gate scores on.
    folds: int = 3
    # How much accuracy the new model may lose against the serving one, on either set
    # (as `routemesh gate`'s): a flip or two among hundreds is noise next to what the
    # reviews fix.
    tolerance: float = 0.01
    max_chars: int = MAX_CHARS


class _Outcome(msgspec.Struct, kw_only=True):
    occurred_at: datetime
    expected_route: str | None = None


class _OutcomeLine(msgspec.Struct, kw_only=True):
    """The fields of an audit record that learning reads."""

    request_id: str
    outcome: _Outcome | None = None


def labelled_outcomes(audit_dir: Path, skipped: Skipped | None = None) -> dict[str, str]:
    """Request id -> the route its latest outcome names, from the audit files."""
    latest: dict[str, _Outcome] = {}
    for row in decoded_lines(audit_dir, msgspec.json.Decoder(_OutcomeLine), skipped):
        o = row.outcome
        if o is None or o.expected_route is None:
            continue
        seen = latest.get(row.request_id)
        if seen is None or o.occurred_at >= seen.occurred_at:
            latest[row.request_id] = o
    return {rid: o.expected_route for rid, o in latest.items() if o.expected_route}


@dataclass(frozen=True)
class Labelled:
    request_id: str
    route: str
    request: RouteRequest
    text_sha256: str


class Refusal(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    route: str
    reason: str


class RouteCounts(msgspec.Struct, kw_only=True):
    utterances: int
    # Outcomes naming this route, and those of them whose capture holds text.
    labelled: int = 0
    with_text: int = 0
    already_learned: int = 0
    quarantined: int = 0
    capped: int = 0
    contradicting: int = 0
    learned: int = 0


@dataclass(frozen=True)
class Batch:
    items: list[Labelled]
    refused: list[Refusal]
    counts: dict[str, RouteCounts]


def gather(labels: dict[str, str], captures: dict[str, Capture], loaded: LoadedConfig,
           policy: LearnPolicy, learned: frozenset[str] = frozenset()) -> Batch:
    """The training items that labels and captures give, each text once, capped per
    route; what is left out is refused with its reason. ``learned``: the text hashes the
    serving model already learned from (counted, and learned from again)."""
    config = loaded.config
    mode = config.semantic.match_text
    utterances = Counter(u.route_id for u in loaded.utterances)
    counts = {r.id: RouteCounts(utterances=utterances[r.id]) for r in config.routes}
    models = {r.target_model: r.id for r in config.routes}
    refused: list[Refusal] = []
    by_text: dict[str, list[Labelled]] = defaultdict(list)

    def quarantine(item: Labelled, reason: str) -> None:
        refused.append(Refusal(request_id=item.request_id, route=item.route, reason=reason))
        counts[item.route].quarantined += 1

    for request_id, route in sorted(labels.items()):
        if route not in counts:
            hint = (f"; label with its route id {models[route]!r}" if route in models
                    else f" ({', '.join(sorted(counts))})")
            refused.append(Refusal(request_id=request_id, route=route,
                                   reason=f"{route!r} is no route of {loaded.source}{hint}"))
            continue
        counts[route].labelled += 1
        capture = captures.get(request_id)
        if capture is None or not capture.text:
            continue  # waiting for text: no capture of this request here
        counts[route].with_text += 1
        request = RouteRequest.from_text(capture.text)

        item = Labelled(request_id, route, request, "")
        if not capture.text.strip():
            quarantine(item, "empty_content: no text to learn from")
        elif request.prompt_chars > policy.max_chars:
            quarantine(item, f"too long: {request.prompt_chars} characters (at most "
                       f"{policy.max_chars})")
        else:
            sha = text_sha256(request.match_text(mode))
            by_text[sha].append(Labelled(request_id, route, request, sha))
    items: list[Labelled] = []
    for sha, same in sorted(by_text.items()):
        routes = sorted({item.route for item in same})
        first = min(same, key=lambda item: item.request_id)
        if len(routes) > 1:
            for item in same:
                quarantine(item, "conflicting labels: the same text is labelled "
                           + " and ".join(routes))
            continue
        for item in same:
            if item is not first:
                quarantine(item, f"duplicate: same text as {first.request_id}")
        items.append(first)
        counts[first.route].already_learned += sha in learned
    kept: list[Labelled] = []
    per_route: dict[str, list[Labelled]] = defaultdict(list)
    for item in sorted(items, key=lambda i: hashed_order(i.request_id)):
        per_route[item.route].append(item)
    for route, group in sorted(per_route.items()):
        cap = max(policy.min_cap, math.ceil(policy.cap_per_utterance
                                            * counts[route].utterances))
        kept += group[:cap]
        counts[route].learned = min(cap, len(group))
        counts[route].capped += max(0, len(group) - cap)
    return Batch(sorted(kept, key=lambda i: i.request_id), refused, counts)


@dataclass(frozen=True)
class Contradiction:
    request_id: str
    route: str
    nearest_route: str
    similarity: float


def contradictions(bank: RouteBank, items: Sequence[Labelled], vectors: np.ndarray,
                   policy: LearnPolicy) -> list[Contradiction]:
    """The items whose nearest utterances all say another route, clearly."""
    found = []
    similarity = bank.dense @ vectors.T.astype(np.float32)
    routes = bank.route_ids
    for column, item in enumerate(items):
        sims = similarity[:, column]
        own = bank.route_of == routes.index(item.route)
        nearest = np.argsort(-sims, kind="stable")[:policy.contradiction_neighbours]
        best_own = float(sims[own].max()) if own.any() else -1.0
        if own[nearest].any() or float(sims[nearest[0]]) - best_own \
                < policy.contradiction_margin:
            continue
        found.append(Contradiction(item.request_id, item.route,
                                   routes[bank.route_of[nearest[0]]],
                                   round(float(sims[nearest[0]]), 4)))
    return found


def training_set(items: Sequence[Labelled], vectors: np.ndarray) -> TrainingSet:
    """The items as the extra training set of a route model; its sha256 names the texts'
    hashes and labels, never the texts."""
    pairs = sorted((item.text_sha256, item.route) for item in items)
    return TrainingSet(
        vectors=vectors, routes=tuple(item.route for item in items),
        text_sha256=tuple(sorted({item.text_sha256 for item in items})),
        sha256=hashlib.sha256(msgspec.json.encode(pairs)).hexdigest())


def folds(items: Sequence[Labelled], count: int) -> list[list[int]]:
    """Item indices in ``count`` folds, each route's items dealt round in a fixed order:
    every fold holds back some of every route that has enough."""
    dealt: list[list[int]] = [[] for _ in range(count)]
    per_route: dict[str, list[int]] = defaultdict(list)
    for index in sorted(range(len(items)), key=lambda i: hashed_order(items[i].request_id)):
        per_route[items[index].route].append(index)
    turn = 0
    for _, indices in sorted(per_route.items()):
        for index in indices:
            dealt[turn % count].append(index)
            turn += 1
    return [sorted(fold) for fold in dealt if fold]


class Figures(msgspec.Struct, frozen=True, kw_only=True):
    items: int
    current: float
    candidate: float
    best_baseline: str | None = None
    best_baseline_accuracy: float | None = None


def _correct(router: Router, items: Sequence[EvalItem]) -> int:
    decided = router.decide_many([(item.request, item.id) for item in items])
    return sum(d.route_id == item.route for d, item in zip(decided, items, strict=True))


def _as_eval(items: Sequence[Labelled]) -> list[EvalItem]:
    return [EvalItem(item.request_id, item.request, item.route) for item in items]


@dataclass(frozen=True)
class Fitted:
    model: RouteModel
    held_back: Figures
    eval: Figures | None
    # Accuracy on the held-back folds by the share of the batch each fold's model learned
    # from (0 is the serving model): the learning curve.
    curve: list[tuple[float, float]]


def _router_with(loaded: LoadedConfig, bank: RouteBank, model: RouteModel,
                 current: Router) -> Router:
    copy = bank.subset(np.arange(len(bank)))
    copy.use(model)
    return Router(loaded, copy, current.encoder)


def fit_and_gate(current: Router, bank: RouteBank, items: Sequence[Labelled],
                 vectors: np.ndarray, eval_items: Sequence[EvalItem] | None,
                 policy: LearnPolicy,
                 progress: Callable[[str], None] = lambda _: None) -> Fitted:
    """The model of the bank and the whole batch, and the gate's figures: each held-back
    fold decided by a model of the other folds and by the serving one; the shipped eval
    (less the batch's own texts) by the new model and the serving one."""
    loaded, semantic = current.loaded, current.config.semantic
    dealt = folds(items, max(2, min(policy.folds, len(items))))
    fractions = (1 / 3, 2 / 3, 1.0)
    correct_current = 0
    correct_at: dict[float, int] = dict.fromkeys(fractions, 0)
    scored = 0
    for number, test in enumerate(dealt, start=1):
        progress(f"fold {number} of {len(dealt)}")
        train = sorted(set(range(len(items))) - set(test))
        held = _as_eval([items[i] for i in test])
        correct_current += _correct(current, held)
        ordered = sorted(train, key=lambda i: hashed_order(items[i].request_id))
        for fraction in fractions:
            part = ordered[:max(1, round(len(ordered) * fraction))]
            model = fit_model(bank, semantic, training_set([items[i] for i in part],
                                                           vectors[part]))
            router = _router_with(loaded, bank, model, current)
            correct_at[fraction] += _correct(router, held)
        scored += len(held)
    progress("fitting on the whole batch")
    model = fit_model(bank, semantic, training_set(items, vectors))
    held_back = Figures(items=scored, current=correct_current / scored,
                        candidate=correct_at[1.0] / scored)
    curve = [(0.0, held_back.current)] + [(f, correct_at[f] / scored) for f in fractions]
    figures = None
    if eval_items is not None:
        learned = {item.text_sha256 for item in items}
        mode = semantic.match_text
        left = [e for e in eval_items if text_sha256(e.request.match_text(mode)) not in learned]
        candidate = _router_with(loaded, bank, model, current)
        shares = Counter(e.route for e in left)
        best, best_count = shares.most_common(1)[0] if shares else (None, 0)
        size = max(1, len(left))
        figures = Figures(items=len(left), current=_correct(current, left) / size,
                          candidate=_correct(candidate, left) / size,
                          best_baseline=f"always-{best}" if best else None,
                          best_baseline_accuracy=best_count / len(left) if left else None)
    return Fitted(model, held_back, figures, curve)


def verdict(fitted: Fitted, policy: LearnPolicy) -> list[str]:
    """Why the new model must not serve (empty: it may)."""
    reasons = []
    for name, f in (("held-back reviewed items", fitted.held_back), ("eval set", fitted.eval)):
        if f is None:
            continue
        if f.candidate < f.current - policy.tolerance:
            reasons.append(f"on the {name} ({f.items}) the new model's accuracy "
                           f"{f.candidate:.3f} is below the serving model's {f.current:.3f}")
        if f.best_baseline_accuracy is not None and f.candidate < f.best_baseline_accuracy:
            reasons.append(f"on the {name} the new model's accuracy {f.candidate:.3f} is "
                           f"below the {f.best_baseline} baseline's "
                           f"{f.best_baseline_accuracy:.3f}")
    return reasons


class LearnReceipt(msgspec.Struct, frozen=True, kw_only=True):
    """What ``routemesh learn`` learned from (hashes and counts, never text), what the gate
    measured and what it did."""

    created_at: datetime
    config_source: str
    config_sha256: str
    route_bank_sha256_before: str
    route_bank_sha256_after: str | None
    routes: dict[str, RouteCounts]
    learned_text_sha256: list[str]
    refused: list[Refusal]
    contradiction_rate: float
    held_back: Figures | None
    eval: Figures | None
    curve: list[tuple[float, float]]
    passed: bool
    reasons: list[str]
    # The batch gives the model that serves already: nothing to write.
    unchanged: bool = False
    # What the command did with a model that passed (``--plan`` writes nothing).
    written: bool = False
    announced: bool = False
    rollback: str | None = None


def without_contradictions(batch: Batch, found: Sequence[Contradiction]) -> Batch:
    """The batch less its contradicting items, each refused with the route its nearest
    utterances say."""
    by_id = {c.request_id: c for c in found}
    refused = list(batch.refused)
    for c in found:
        counts = batch.counts[c.route]
        counts.contradicting += 1
        counts.learned -= 1
        refused.append(Refusal(
            request_id=c.request_id, route=c.route,
            reason=f"contradicts the bank: its nearest utterances are all {c.nearest_route}"
                   f" (cosine {c.similarity:.3f}), none {c.route}"))
    return Batch([i for i in batch.items if i.request_id not in by_id], refused,
                 batch.counts)


@dataclass(frozen=True)
class Learned:
    receipt: LearnReceipt
    # The model to write (None: the gate refused it, or there was nothing to learn).
    model: RouteModel | None


def learn(current: Router, bank: RouteBank, labels: dict[str, str],
          captures: dict[str, Capture], eval_items: Sequence[EvalItem] | None,
          policy: LearnPolicy, progress: Callable[[str], None] = lambda _: None) -> Learned:
    """Gather, guard, fit and gate a batch against ``bank`` (the serving bank, with its
    model) and ``current`` (a router on it)."""
    loaded = current.loaded
    serving = bank.model
    batch = gather(labels, captures, loaded, policy, frozenset(serving.train_text_sha256))

    def done(batch: Batch, rate: float, fitted: Fitted | None, reasons: list[str],
             model: RouteModel | None) -> Learned:
        return Learned(LearnReceipt(
            created_at=utc_now(), config_source=loaded.source, config_sha256=loaded.sha256,
            route_bank_sha256_before=bank.sha256,
            route_bank_sha256_after=(route_bank_sha256(bank.utterances_sha256, model)
                                     if model is not None else None),
            routes=batch.counts,
            learned_text_sha256=sorted(item.text_sha256 for item in batch.items),
            refused=batch.refused, contradiction_rate=round(rate, 4),
            held_back=fitted.held_back if fitted else None,
            eval=fitted.eval if fitted else None, curve=fitted.curve if fitted else [],
            passed=not reasons, reasons=reasons), model)

    if len(batch.items) < 2:
        return done(batch, 0.0, None, [
            f"nothing to learn: {len(batch.items)} labelled outcomes with captured text "
            "passed the guards (at least 2 are needed to hold some back)"], None)
    progress(f"encoding {len(batch.items)} reviewed texts")
    mode = loaded.config.semantic.match_text
    assert current.encoder is not None
    vectors = current.encoder.encode([item.request.match_text(mode) for item in batch.items])
    found = contradictions(bank, batch.items, vectors, policy)
    rate = len(found) / len(batch.items)
    if rate > policy.max_contradiction_rate:
        return done(batch, rate, None, [
            f"poisoned batch: {len(found)} of {len(batch.items)} labels ({rate:.0%}) "
            f"contradict the bank's own utterances (at most "
            f"{policy.max_contradiction_rate:.0%} may)"], None)
    if found:
        keep = [i for i, item in enumerate(batch.items)
                if item.request_id not in {c.request_id for c in found}]
        batch, vectors = without_contradictions(batch, found), vectors[keep]
    if len(batch.items) < 2:
        return done(batch, rate, None, ["nothing to learn once contradicting labels are "
                                        "left out"], None)
    fitted = fit_and_gate(current, bank, batch.items, vectors, eval_items, policy,
                          progress)
    if route_bank_sha256(bank.utterances_sha256, fitted.model) == bank.sha256:
        same = done(batch, rate, fitted, [
            "unchanged: the serving model learned from exactly this batch already"], None)
        return Learned(msgspec.structs.replace(same.receipt, unchanged=True), None)
    reasons = verdict(fitted, policy)
    return done(batch, rate, fitted, reasons, None if reasons else fitted.model)


def default_eval(config: Path) -> Path | None:
    """The eval set shipped beside a config (``NAME.eval.jsonl`` for ``NAME.yaml``)."""
    beside = config.with_suffix(".eval.jsonl")
    return beside if beside.is_file() else None


PREVIOUS_MODEL = "previous-model.json"


@dataclass(frozen=True)
class LearnRun:
    """One learn, done: its receipt (written at ``receipt_path`` unless planned) and what
    announcing the bank it wrote needs."""

    receipt: LearnReceipt
    receipt_path: Path
    loaded: LoadedConfig
    collection: str
    encoder: str
    utterances: int

    def announced(self) -> LearnRun:
        done = msgspec.structs.replace(self.receipt, announced=True)
        write_atomically(self.receipt_path, pretty_json(done))
        return dataclasses.replace(self, receipt=done)


def run(config: Path, client: QdrantClient, audit_dir: Path, captures_dir: Path,
        eval_path: Path | None, out: Path, policy: LearnPolicy, *, plan: bool = False,
        skipped: Skipped | None = None,
        progress: Callable[[str], None] = lambda _: None) -> LearnRun:
    """Learn from the audit and capture directories against the bank in ``client``;
    unless ``plan``, write the model when the gate passes (the one it replaces beside the
    receipt, for the rollback) and the receipt either way, under ``out/<time>/``."""
    loaded = load_config(config)
    current = load_router(loaded, qdrant=client)
    collection = default_collection(loaded)
    bank = load_snapshot(client, collection, loaded.config.semantic)
    eval_path = eval_path or default_eval(config)
    eval_items = load_dataset(eval_path) if eval_path is not None else None
    learned = learn(current, bank, labelled_outcomes(audit_dir, skipped),
                    read_captures(captures_dir, with_text=True, skipped=skipped),
                    eval_items, policy, progress)
    receipt = learned.receipt
    where = out / receipt.created_at.strftime("%Y%m%dT%H%M%S")
    if not plan:
        where.mkdir(parents=True, exist_ok=True)
        if learned.model is not None:
            write_atomically(where / PREVIOUS_MODEL, pretty_json(bank.model))
            store_model(client, collection, learned.model)
            receipt = msgspec.structs.replace(receipt, written=True, rollback=(
                f"rollback: routemesh learn rollback --config {config} --receipt "
                f"{where / 'receipt.json'} --announce (serves route bank "
                f"{receipt.route_bank_sha256_before[:12]} again)"))
        write_atomically(where / "receipt.json", pretty_json(receipt))
    return LearnRun(receipt, where / "receipt.json", loaded, collection, bank.encoder_name,
                    len(bank))
