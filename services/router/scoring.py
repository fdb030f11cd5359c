"""How a bank's similarities become route probabilities, fitted on the bank itself.

A route's raw score comes from its utterances' blended similarities (``max``, the mean
of the ``k`` best, or the similarity to the route's centroid) or from a multinomial
logistic head over the query's dense vector. Raw scores become probabilities by a softmax
at a temperature fitted on out-of-fold scores, so a threshold means the same on every
route and config: "at least this likely to be right".

Everything is fitted at bank build, deterministically (fixed folds, a fixed seed, the
bank's own order), and stored with the bank as a ``RouteModel``; its sha256 is part of
the bank's. Folds hold out whole paraphrase groups (utterances of a route that say
nearly the same thing), never single lines: a near-copy of a held-out utterance left in
training would flatter every choice.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Literal

import msgspec
import numpy as np

Scoring = Literal["max", "topk_mean", "centroid", "logistic"]
# Utterances of one route closer than this (cosine) are one paraphrase group.
PARAPHRASE_COSINE = 0.6
FOLDS = 5
SEED = 20261130
# The logistic head's inverse regularisation strengths tried in cross-validation.
C_GRID = (0.25, 1.0, 4.0, 16.0)
# Fewer held-out scores than this say too little to fit a temperature on: a bank of a
# few utterances a route would fit one that makes every answer a coin toss. It keeps a
# prior instead: logits as they are, or a twentieth of the similarity scale (two routes
# whose similarities differ by 0.05 are then e : 1).
MIN_CALIBRATION_ROWS = 30
PRIOR_TEMPERATURE = {"logistic": 1.0, "max": 0.05, "topk_mean": 0.05, "centroid": 0.05}
# The share of the bank's own utterances (out of fold) allowed below the evidence floor.
EVIDENCE_FLOOR_PERCENTILE = 2.0


class HeadWeights(msgspec.Struct, frozen=True, kw_only=True):
    """A multinomial logistic head: logits = weights @ dense + bias, one row per route."""

    weights: list[list[float]]
    bias: list[float]
    c: float


class Validation(msgspec.Struct, frozen=True, kw_only=True):
    """Out-of-fold figures of the fitted scoring on the bank's own utterances."""

    folds: int
    groups: int
    accuracy: float | None
    expected_calibration_error: float | None


class RouteModel(msgspec.Struct, frozen=True, kw_only=True):
    """What turns a bank's similarities into calibrated route probabilities."""

    routes: tuple[str, ...]
    scoring: Scoring
    k: int = 3
    temperature: float = 1.0
    head: HeadWeights | None = None
    # Of what was fitted: the bank's content and encoder, the scoring settings, the
    # extra training set. A model whose inputs differ from a config's is stale.
    inputs_sha256: str
    train_sha256: str | None = None
    # Text sha256 of every extra training prompt: an eval refuses to score them.
    train_text_sha256: tuple[str, ...] = ()
    validation: Validation | None = None
    # A decision whose top route's nearest utterance scores below this is low-confidence
    # whatever its probability (bank._evidence_floor says why).
    evidence_floor: float = 0.0

    @property
    def sha256(self) -> str:
        return hashlib.sha256(msgspec.json.encode(self)).hexdigest()


def softmax(raw: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise probabilities of raw scores (queries x routes)."""
    z = raw / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    probabilities: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return probabilities


def fit_temperature(raw: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of the true routes
    (``labels`` index the columns of ``raw``): one parameter, so it cannot overfit a
    small bank, and it keeps every ranking as it was."""
    from scipy.optimize import minimize_scalar

    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        p = softmax(raw, math.exp(log_t))
        return float(-np.log(np.maximum(p[rows, labels], 1e-12)).mean())

    best = minimize_scalar(nll, bounds=(math.log(1e-3), math.log(1e3)), method="bounded",
                           options={"xatol": 1e-4})
    return float(math.exp(best.x))


def paraphrase_groups(vectors: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """A group id per utterance. Each utterance, in the bank's order, joins the first
    group of its route whose first utterance it is at least ``PARAPHRASE_COSINE`` close
    to, or starts one: groups are paraphrases of one utterance. (Joining on any close
    member instead would chain a homogeneous route into one group, and holding out a
    whole route measures nothing.)"""
    groups = np.empty(len(labels), dtype=int)
    leaders: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        own = leaders.setdefault(label, [])
        close = [lead for lead in own if float(vectors[i] @ vectors[lead]) >= PARAPHRASE_COSINE]
        if close:
            groups[i] = groups[close[0]]
        else:
            own.append(i)
            groups[i] = i
    return groups


def folds(groups: np.ndarray) -> list[np.ndarray]:
    """Held-out index sets: whole groups, dealt round-robin in a seeded shuffle. Fewer
    than two groups give no folds."""
    unique = np.unique(groups)
    count = min(FOLDS, len(unique))
    if count < 2:
        return []
    order = np.random.default_rng(SEED).permutation(unique)
    fold_of = {group: i % count for i, group in enumerate(order)}
    assignment = np.array([fold_of[g] for g in groups])
    return [np.flatnonzero(assignment == f) for f in range(count)]


def fit_logistic(vectors: np.ndarray, labels: np.ndarray, routes: int, c: float) -> HeadWeights:
    """A multinomial logistic regression (scikit-learn's lbfgs: a small, deterministic,
    well-kept solver; writing one here would be the same maths, less tested)."""
    from sklearn.linear_model import LogisticRegression

    present = np.unique(labels)
    weights = np.zeros((routes, vectors.shape[1]))
    bias = np.full(routes, -30.0)
    if len(present) == 1:
        bias[present[0]] = 0.0
    else:
        model = LogisticRegression(C=c, max_iter=5000, random_state=SEED)
        model.fit(vectors, labels)
        rows = model.classes_
        if len(rows) == 2:
            # Binary: scikit-learn keeps one row; the softmax of (-z/2, z/2) is the same.
            half = model.coef_[0] / 2
            weights[rows[0]], weights[rows[1]] = -half, half
            bias[rows[0]], bias[rows[1]] = -model.intercept_[0] / 2, model.intercept_[0] / 2
        else:
            weights[rows], bias[rows] = model.coef_, model.intercept_
    return HeadWeights(weights=weights.tolist(), bias=bias.tolist(), c=c)


def head_logits(head: HeadWeights, dense: np.ndarray) -> np.ndarray:
    logits: np.ndarray = dense @ np.asarray(head.weights, dtype=np.float64).T \
        + np.asarray(head.bias)
    return logits


class Reliability(msgspec.Struct, frozen=True, kw_only=True):
    """Predicted probability against observed accuracy, per probability bucket."""

    low: float
    high: float
    count: int
    mean_confidence: float | None
    accuracy: float | None


def reliability(
    confidence: Sequence[float], correct: Sequence[bool], buckets: int = 10
) -> tuple[list[Reliability], float | None]:
    """The reliability table and the expected calibration error (the count-weighted mean
    gap between confidence and accuracy)."""
    conf = np.asarray(confidence, dtype=float)
    hit = np.asarray(correct, dtype=float)
    table, gap = [], 0.0
    for b in range(buckets):
        low, high = b / buckets, (b + 1) / buckets
        inside = (conf >= low) & ((conf < high) if b < buckets - 1 else (conf <= high))
        n = int(inside.sum())
        mean_conf = float(conf[inside].mean()) if n else None
        accuracy = float(hit[inside].mean()) if n else None
        if mean_conf is not None and accuracy is not None:
            gap += n * abs(mean_conf - accuracy)
        table.append(Reliability(low=low, high=high, count=n, mean_confidence=mean_conf,
                                 accuracy=accuracy))
    return table, (gap / len(conf) if len(conf) else None)
