"""The route bank: utterances embedded into Qdrant (named dense + sparse vectors), the
route model fitted on them (``scoring``), an in-memory snapshot for the hot path, and a
back-end that queries Qdrant directly.

Both back-ends score an utterance the same way:

    blended = w * cosine(dense) + (1 - w) * s / (s + scale),  s = BM25 (IDF at query time)

A route's raw score is an aggregation of its utterances' (or the logistic head's logit),
turned into a calibrated probability by the route model. The nearest utterance of a
route (its best blended score) is the evidence a decision carries. The snapshot scores
every utterance; the Qdrant back-end the union of the dense and sparse top candidates,
server-side.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
from qdrant_client import QdrantClient, models
from threadpoolctl import threadpool_limits

from routemesh.contracts import RouteBankPublished
from routemesh.services.router.config import LoadedConfig, SemanticConfig, Utterance
from routemesh.services.router.encoders import DenseEncoder, SparseEncoder, SparseVector, idf
from routemesh.services.router.scoring import (
    C_GRID,
    EVIDENCE_FLOOR_PERCENTILE,
    MIN_CALIBRATION_ROWS,
    PRIOR_TEMPERATURE,
    RouteModel,
    Validation,
    fit_logistic,
    fit_temperature,
    folds,
    head_logits,
    paraphrase_groups,
    reliability,
    softmax,
)

DENSE = "dense"
SPARSE = "sparse"
_POINT_NAMESPACE = uuid.UUID("6f1c1d2e-8f7a-4c1b-9a57-0d1f3a2b4c5d")


def limit_blas_threads() -> None:
    """Run BLAS single-threaded in this process.

    Matching multiplies one vector by the bank matrix: a second BLAS thread gains
    nothing on that, and its spinning takes a core from the encoder (bench/decision.py
    shows both the median and the tail of decisions fall with one thread). It is
    process-wide, so the process that serves decisions calls it once at assembly.
    """
    threadpool_limits(limits=1, user_api="blas")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class BankEntry:
    route_id: str
    source: str
    index: int
    text_sha256: str
    provenance: str


def utterances_sha256(entries: Sequence[BankEntry], encoder_name: str, k1: float, b: float) -> str:
    """Identifies the bank's utterances and how they were encoded, independent of order
    (the route model fitted on them adds its own digest: ``route_bank_sha256``)."""
    digest = hashlib.sha256(f"{encoder_name}\nbm25 k1={k1} b={b}\n".encode())
    for line in sorted(f"{e.route_id}\t{e.source}\t{e.index}\t{e.text_sha256}" for e in entries):
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def _entry(utterance: Utterance) -> BankEntry:
    return BankEntry(
        utterance.route_id,
        utterance.source,
        utterance.index,
        text_sha256(utterance.text),
        utterance.provenance,
    )


def _point_id(encoder_name: str, entry: BankEntry) -> str:
    key = f"{encoder_name}|{entry.route_id}|{entry.source}|{entry.index}|{entry.text_sha256}"
    return str(uuid.uuid5(_POINT_NAMESPACE, key))


@dataclass(frozen=True)
class BuildReport:
    collection: str
    embedded: int
    removed: int
    kept: int
    sha256: str
    encoder: str
    model: RouteModel


def route_bank_sha256(utterances_sha256: str, model: RouteModel) -> str:
    """The identity a decision carries: the utterances and the route model fitted on them."""
    return hashlib.sha256(f"{utterances_sha256}\n{model.sha256}".encode()).hexdigest()


def announcement(loaded: LoadedConfig, collection: str, sha256: str, encoder: str,
                 utterances: int) -> RouteBankPublished:
    """What tells running gateways that ``collection`` holds a new bank for ``loaded``."""
    return RouteBankPublished(
        collection=collection, route_bank_sha256=sha256, encoder=encoder,
        utterances=utterances, routes=tuple(r.id for r in loaded.config.routes),
        config_sha256=loaded.sha256)


def config_utterances_sha256(loaded: LoadedConfig, encoder_name: str) -> str:
    """The utterances sha256 that building ``loaded`` with this encoder gives."""
    semantic = loaded.config.semantic
    entries = [_entry(u) for u in loaded.utterances]
    return utterances_sha256(entries, encoder_name, semantic.bm25_k1, semantic.bm25_b)


def model_inputs_sha256(
    utterances_sha256: str, semantic: SemanticConfig, train_sha256: str | None
) -> str:
    """What a route model is fitted from: the utterances (with their encoder), every
    semantic setting that changes a score, and the extra training set."""
    settings = {name: getattr(semantic, name) for name in (
        "dense_weight", "bm25_k1", "bm25_b", "sparse_scale", "aggregation", "k", "head")}
    return hashlib.sha256(msgspec.json.encode(
        [utterances_sha256, settings, train_sha256])).hexdigest()


@dataclass(frozen=True)
class TrainingSet:
    """Labelled prompts beyond the utterances (``bank build --train``): they train the
    head (and its calibration), never the bank's nearest-utterance evidence."""

    vectors: np.ndarray
    routes: tuple[str, ...]
    text_sha256: tuple[str, ...]
    sha256: str


def model_collection(collection: str) -> str:
    return f"{collection}-model"


def default_collection(loaded: LoadedConfig) -> str:
    return loaded.config.bank.collection or "routemesh-routes"


def build_bank(
    loaded: LoadedConfig,
    encoder: DenseEncoder,
    client: QdrantClient,
    collection: str | None = None,
    batch_size: int = 64,
    train: TrainingSet | None = None,
) -> BuildReport:
    """Upsert every utterance (embedding only those not already stored for this encoder),
    then fit the route model on the whole bank and store it beside it."""
    collection = collection or default_collection(loaded)
    semantic = loaded.config.semantic
    entries = [_entry(u) for u in loaded.utterances]
    texts = [u.text for u in loaded.utterances]
    sparse = SparseEncoder(semantic.bm25_k1, semantic.bm25_b).fit(texts)
    wanted = {_point_id(encoder.name, e): (e, t) for e, t in zip(entries, texts, strict=True)}

    existing = _existing_ids(client, collection)
    missing = [pid for pid in wanted if pid not in existing]
    stale = [pid for pid in existing if pid not in wanted]
    if missing and not client.collection_exists(collection):
        first = encoder.encode([wanted[missing[0]][1]])
        _create_collection(client, collection, first.shape[1])
        existing = set()

    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        vectors = encoder.encode([wanted[pid][1] for pid in chunk])
        client.upsert(
            collection,
            points=[
                models.PointStruct(
                    id=pid,
                    vector={
                        DENSE: vectors[row].tolist(),
                        SPARSE: _qdrant_sparse(sparse.document(wanted[pid][1])),
                    },
                    payload={
                        "route_id": wanted[pid][0].route_id,
                        "source": wanted[pid][0].source,
                        "index": wanted[pid][0].index,
                        "text_sha256": wanted[pid][0].text_sha256,
                        "provenance": wanted[pid][0].provenance,
                        "encoder": encoder.name,
                    },
                )
                for row, pid in enumerate(chunk)
            ],
        )
    if stale:
        client.delete(collection, points_selector=models.PointIdsList(points=stale))
    kept = [pid for pid in wanted if pid in existing]
    if kept and (missing or stale):
        # Document weights depend on the bank's average length, which just changed:
        # refresh the sparse side of the points we kept (no re-embedding needed).
        for start in range(0, len(kept), 256):
            client.update_vectors(
                collection,
                points=[
                    models.PointVectors(
                        id=pid, vector={SPARSE: _qdrant_sparse(sparse.document(wanted[pid][1]))}
                    )
                    for pid in kept[start : start + 256]
                ],
            )
    snapshot = load_snapshot(client, collection, semantic, require_model=False)
    stored = _load_model(client, collection)
    if train is None and stored is not None and stored.inputs_sha256 == model_inputs_sha256(
            snapshot.utterances_sha256, semantic, stored.train_sha256):
        # The stored model still fits this bank and these settings: keep it, with what
        # it learned beyond the utterances (`routemesh learn`, `--train`), which a refit
        # without that set would silently drop at every gateway start's bank build.
        model = stored
    else:
        model = fit_model(snapshot, semantic, train)
        store_model(client, collection, model)
    return BuildReport(
        collection,
        embedded=len(missing),
        removed=len(stale),
        kept=len(kept),
        sha256=route_bank_sha256(snapshot.utterances_sha256, model),
        encoder=encoder.name,
        model=model,
    )


def store_model(client: QdrantClient, collection: str, model: RouteModel) -> None:
    """The model as the one point of a collection beside the bank (Qdrant holds payloads,
    not files: it lives wherever the bank does, server or local mode)."""
    name = model_collection(collection)
    if not client.collection_exists(name):
        client.create_collection(
            name, vectors_config=models.VectorParams(size=1, distance=models.Distance.DOT))
    client.upsert(name, points=[models.PointStruct(
        id=str(uuid.uuid5(_POINT_NAMESPACE, "route-model")), vector=[1.0],
        payload={"model": msgspec.json.encode(model).decode()})])


def _load_model(client: QdrantClient, collection: str) -> RouteModel | None:
    name = model_collection(collection)
    if not client.collection_exists(name):
        return None
    points, _ = client.scroll(name, limit=1, with_payload=True, with_vectors=False)
    if not points:
        return None
    return msgspec.json.decode((points[0].payload or {})["model"], type=RouteModel)


def _create_collection(client: QdrantClient, collection: str, dim: int) -> None:
    client.create_collection(
        collection,
        vectors_config={DENSE: models.VectorParams(size=dim, distance=models.Distance.COSINE)},
        sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
    )


def _existing_ids(client: QdrantClient, collection: str) -> set[str]:
    if not client.collection_exists(collection):
        return set()
    ids: set[str] = set()
    offset = None
    while True:
        points, offset = client.scroll(
            collection, limit=1024, offset=offset, with_payload=False, with_vectors=False
        )
        ids.update(str(p.id) for p in points)
        if offset is None:
            return ids


def _qdrant_sparse(vector: SparseVector) -> models.SparseVector:
    return models.SparseVector(indices=list(vector.indices), values=list(vector.values))


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """A route's calibrated probability for a query, and its nearest utterance."""

    route_id: str
    score: float
    # The route's best-matching utterance (None when the Qdrant back-end's candidates
    # held none of the route's utterances).
    entry: BankEntry | None
    # The nearest utterance's blended, dense and sparse similarities.
    match_score: float
    dense: float
    sparse: float


class Matcher:
    """What the cascade needs from a bank: ranked route matches for a query."""

    sha256: str
    utterances_sha256: str
    encoder_name: str
    model: RouteModel

    def match(
        self, dense: np.ndarray, sparse: SparseVector, semantic: SemanticConfig
    ) -> list[RouteMatch]:
        raise NotImplementedError

    def match_many(
        self, dense: np.ndarray, sparse: Sequence[SparseVector], semantic: SemanticConfig
    ) -> list[list[RouteMatch]]:
        """One ranking per row of ``dense``."""
        return [self.match(row, query, semantic) for row, query in zip(dense, sparse, strict=True)]


def _raw_scores(
    model: RouteModel, routes: Sequence[str], blended_by_route: list[np.ndarray],
    dense: np.ndarray, centroids: np.ndarray | None,
) -> np.ndarray:
    """Raw route scores (queries x routes): an aggregation of each route's blended
    utterance scores (``blended_by_route[r]`` is utterances x queries), the cosine to the
    route's centroid, or the logistic head's logits."""
    if model.scoring == "logistic":
        assert model.head is not None
        return head_logits(model.head, dense)
    if model.scoring == "centroid":
        assert centroids is not None
        similarities: np.ndarray = dense @ centroids.T
        return similarities
    columns = []
    for scores in blended_by_route:
        if model.scoring == "max":
            columns.append(scores.max(axis=0))
        else:
            k = min(model.k, len(scores))
            columns.append(np.sort(scores, axis=0)[-k:].mean(axis=0))
    return np.stack(columns, axis=1)


def _ranked(routes: Sequence[str], probabilities: np.ndarray,
            evidence: Sequence[tuple[BankEntry | None, float, float, float]]
            ) -> list[RouteMatch]:
    matches = [RouteMatch(route, float(p), *evidence[i])
               for i, (route, p) in enumerate(zip(routes, probabilities, strict=True))]
    # Ties (a tiny bank, an all-zero query) break by route id: the same every time.
    return sorted(matches, key=lambda m: (-m.score, m.route_id))


class RouteBank(Matcher):
    """The in-memory snapshot: a dense matrix, a sparse inverted index, the route model."""

    def __init__(
        self,
        entries: Sequence[BankEntry],
        dense: np.ndarray,
        sparse_docs: Sequence[SparseVector],
        encoder_name: str,
        utterances_sha256: str,
        model: RouteModel | None = None,
    ) -> None:
        # A canonical order (not the order points came back from Qdrant in), so the same
        # bank gives the same folds, the same fitted model and the same evidence anywhere.
        order = sorted(range(len(entries)), key=lambda i: (
            entries[i].route_id, entries[i].source, entries[i].index, entries[i].text_sha256))
        self.entries = [entries[i] for i in order]
        self.dense = np.ascontiguousarray(dense[order], dtype=np.float32)
        self.encoder_name = encoder_name
        self.utterances_sha256 = utterances_sha256
        self.route_ids = sorted({e.route_id for e in self.entries})
        route_of = np.array([self.route_ids.index(e.route_id) for e in self.entries])
        self.route_of = route_of
        self._route_starts = np.flatnonzero(np.r_[True, route_of[1:] != route_of[:-1]])
        self._route_stops = np.r_[self._route_starts[1:], len(self.entries)]
        postings: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for row, i in enumerate(order):
            for term, weight in zip(sparse_docs[i].indices, sparse_docs[i].values, strict=True):
                postings[term].append((row, weight))
        n = len(self.entries)
        self._postings = {
            term: (
                np.array([r for r, _ in items], dtype=np.int64),
                np.array([w for _, w in items], dtype=np.float32) * idf(len(items), n),
            )
            for term, items in postings.items()
        }
        self._sparse_docs = [sparse_docs[i] for i in order]
        self.centroids = _centroids(self.dense, self._route_starts, self._route_stops)
        self.use(model)

    def use(self, model: RouteModel | None) -> None:
        """Score with ``model`` (None: only while the model itself is being fitted)."""
        self.model = model  # type: ignore[assignment]
        self.sha256 = (route_bank_sha256(self.utterances_sha256, model) if model is not None
                       else self.utterances_sha256)

    def subset(self, rows: np.ndarray) -> RouteBank:
        """A bank of some of this one's rows (a cross-validation fold's training part)."""
        return RouteBank([self.entries[i] for i in rows], self.dense[rows],
                         [self._sparse_docs[i] for i in rows], self.encoder_name,
                         self.utterances_sha256)

    def __len__(self) -> int:
        return len(self.entries)

    def match(
        self, dense: np.ndarray, sparse: SparseVector, semantic: SemanticConfig
    ) -> list[RouteMatch]:
        return self.match_many(dense[None, :], [sparse], semantic)[0]

    def blended(
        self, dense: np.ndarray, sparse: Sequence[SparseVector], semantic: SemanticConfig,
        start: int = 0, stop: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Blended, cosine and squashed-BM25 scores, utterances (rows ``start`` to
        ``stop``) x queries."""
        stop = len(self.entries) if stop is None else stop
        matrix = self.dense[start:stop]
        # One matrix product for the whole batch: far cheaper than a product per query.
        # A lone query takes the matrix-vector path, whose tail on a large bank is well
        # below a one-column matrix product's (bench/decision.py, match only).
        cosine = (matrix @ dense[0])[:, None] if len(dense) == 1 else matrix @ dense.T
        bm25 = np.zeros_like(cosine)
        for column, query in enumerate(sparse):
            for term in query.indices:
                posting = self._postings.get(term)
                if posting is not None:
                    rows, weights = posting
                    lo, hi = np.searchsorted(rows, (start, stop))
                    bm25[rows[lo:hi] - start, column] += weights[lo:hi]
        squashed = bm25 / (bm25 + semantic.sparse_scale)
        w = semantic.dense_weight
        return w * cosine + (1 - w) * squashed, cosine, squashed

    def raw_scores(
        self, dense: np.ndarray, sparse: Sequence[SparseVector], semantic: SemanticConfig,
        scoring: RouteModel,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        blended, cosine, squashed = self.blended(dense, sparse, semantic)
        by_route = [blended[start:stop] for start, stop in
                    zip(self._route_starts, self._route_stops, strict=True)]
        raw = _raw_scores(scoring, self.route_ids, by_route, dense, self.centroids)
        return raw, blended, cosine, squashed

    def match_many(
        self, dense: np.ndarray, sparse: Sequence[SparseVector], semantic: SemanticConfig
    ) -> list[list[RouteMatch]]:
        if self.model.scoring in ("logistic", "centroid"):
            return self._match_top_evidence(dense, sparse, semantic)
        raw, blended, cosine, squashed = self.raw_scores(dense, sparse, semantic, self.model)
        probabilities = softmax(raw, self.model.temperature)
        best_rows = [
            start + np.argmax(blended[start:stop], axis=0)
            for start, stop in zip(self._route_starts, self._route_stops, strict=True)
        ]
        rankings = []
        for column in range(blended.shape[1]):
            evidence = []
            for rows in best_rows:
                row = int(rows[column])
                evidence.append((self.entries[row], float(blended[row, column]),
                                 float(cosine[row, column]), float(squashed[row, column])))
            rankings.append(_ranked(self.route_ids, probabilities[column], evidence))
        return rankings


    def _match_top_evidence(
        self, dense: np.ndarray, sparse: Sequence[SparseVector], semantic: SemanticConfig
    ) -> list[list[RouteMatch]]:
        """The head and the centroids score routes without the utterances, and a decision
        reads only its top route's nearest utterance: so only that route's rows are
        scored, once per batch for all the queries it tops. The other routes carry no
        evidence. The top route's evidence is what the whole bank gives it (the same rows,
        the same products), at a fraction of the bank's cost (bench/decision.py)."""
        raw = _raw_scores(self.model, self.route_ids, [], dense, self.centroids)
        probabilities = softmax(raw, self.model.temperature)
        none = (None, 0.0, 0.0, 0.0)
        rankings = [_ranked(self.route_ids, p, [none] * len(self.route_ids))
                    for p in probabilities]
        topped: dict[int, list[int]] = defaultdict(list)
        for column, ranking in enumerate(rankings):
            topped[self.route_ids.index(ranking[0].route_id)].append(column)
        for route, columns in topped.items():
            start, stop = int(self._route_starts[route]), int(self._route_stops[route])
            blended, cosine, squashed = self.blended(
                dense[columns], [sparse[c] for c in columns], semantic, start, stop)
            best = np.argmax(blended, axis=0)
            for i, column in enumerate(columns):
                row, top = int(best[i]), rankings[column][0]
                rankings[column][0] = RouteMatch(
                    top.route_id, top.score, self.entries[start + row],
                    float(blended[row, i]), float(cosine[row, i]), float(squashed[row, i]))
        return rankings


def _centroids(dense: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    rows = [dense[start:stop].mean(axis=0) for start, stop in zip(starts, stops, strict=True)]
    centroids = np.asarray(rows, dtype=np.float32)
    normalised: np.ndarray = centroids / np.maximum(
        np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return normalised


@dataclass
class CrossValidation:
    """A bank (and extra training set) split into folds of whole paraphrase groups."""

    bank: RouteBank
    semantic: SemanticConfig
    base: RouteModel
    vectors: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    held_out: list[np.ndarray]

    def scores(self, c: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores of every held-out row by a model of the other rows (a head of
        regularisation ``c``), and the rows' true route indices."""
        bank, labels, n_bank = self.bank, self.labels, len(self.bank)
        routes = len(bank.route_ids)
        raw, rows = [], []
        for test in self.held_out:
            train_rows = np.setdiff1d(np.arange(len(labels)), test)
            bank_rows = train_rows[train_rows < n_bank]
            if self.base.scoring == "logistic":
                head = fit_logistic(self.vectors[train_rows], labels[train_rows], routes, c)
                raw.append(head_logits(head, self.vectors[test]))
            else:
                if len(np.unique(labels[bank_rows])) < routes:
                    continue  # a fold that takes a whole route away scores nothing fair
                queries = [bank._sparse_docs[i] if i < n_bank else SparseVector((), ())
                           for i in test]
                fold_raw, *_ = bank.subset(bank_rows).raw_scores(
                    self.vectors[test].astype(np.float32), _as_queries(queries),
                    self.semantic, self.base)
                raw.append(fold_raw)
            rows.append(test)
        if not rows:
            return np.zeros((0, routes)), np.zeros(0, dtype=int)
        return np.vstack(raw), labels[np.concatenate(rows)]


def cross_validation(
    bank: RouteBank, semantic: SemanticConfig, train: TrainingSet | None = None
) -> CrossValidation:
    routes = bank.route_ids
    index = {route: i for i, route in enumerate(routes)}
    vectors = bank.dense.astype(np.float64)
    labels = bank.route_of
    if train is not None:
        unknown = sorted(set(train.routes) - set(routes))
        if unknown:
            raise ValueError(f"training set names routes the bank has not: {unknown}")
        vectors = np.vstack([vectors, train.vectors.astype(np.float64)])
        labels = np.concatenate([labels, [index[r] for r in train.routes]])
    groups = paraphrase_groups(vectors, [routes[i] for i in labels])
    base = RouteModel(
        routes=tuple(routes),
        scoring="logistic" if semantic.head == "logistic" else semantic.aggregation,
        k=semantic.k,
        inputs_sha256=model_inputs_sha256(bank.utterances_sha256, semantic,
                                          train.sha256 if train else None),
        train_sha256=train.sha256 if train else None,
        train_text_sha256=train.text_sha256 if train else (),
    )
    return CrossValidation(bank, semantic, base, vectors, labels, groups, folds(groups))


def fit_model(
    bank: RouteBank, semantic: SemanticConfig, train: TrainingSet | None = None
) -> RouteModel:
    """Fit the route model the config asks for on the bank (and any extra training set):
    the head's regularisation by cross-validation over paraphrase groups, then the
    temperature on out-of-fold scores, then the final fit on everything."""
    cv = cross_validation(bank, semantic, train)
    scoring = cv.base.scoring
    c = 1.0
    if scoring == "logistic" and len(cv.labels) >= MIN_CALIBRATION_ROWS and cv.held_out:
        def loss(c_: float) -> float:
            raw, truth = cv.scores(c_)
            p = softmax(raw, fit_temperature(raw, truth))
            return float(-np.log(np.maximum(p[np.arange(len(truth)), truth], 1e-12)).mean())

        c = min(C_GRID, key=loss)
    raw, truth = cv.scores(c)
    temperature = (fit_temperature(raw, truth) if len(truth) >= MIN_CALIBRATION_ROWS
                   else PRIOR_TEMPERATURE[scoring])
    validation = None
    if len(truth):
        p = softmax(raw, temperature)
        predicted = p.argmax(axis=1)
        _, ece = reliability(p.max(axis=1), predicted == truth)
        validation = Validation(folds=len(cv.held_out), groups=len(np.unique(cv.groups)),
                                accuracy=float((predicted == truth).mean()),
                                expected_calibration_error=ece)
    head = (fit_logistic(cv.vectors, cv.labels, len(bank.route_ids), c)
            if scoring == "logistic" else None)
    return msgspec.structs.replace(cv.base, temperature=temperature, head=head,
                                   validation=validation,
                                   evidence_floor=_evidence_floor(bank, cv.held_out, semantic))


def _evidence_floor(bank: RouteBank, held_out: list[np.ndarray], semantic: SemanticConfig
                    ) -> float:
    """How close an utterance of the bank is to its route's nearest other utterance, out
    of fold, at the ``EVIDENCE_FLOOR_PERCENTILE``: a prompt less like its top route than
    nearly every real utterance is to theirs is like nothing the bank knows. Route
    probabilities are relative (a prompt like nothing is still a little more like one
    route than another), so without this floor nonsense is routed with confidence."""
    nearest = []
    for test in held_out:
        rows = test[test < len(bank)]
        keep = np.setdiff1d(np.arange(len(bank)), rows)
        if not len(rows) or not len(keep):
            continue
        fold_bank = bank.subset(keep)
        blended, _, _ = fold_bank.blended(bank.dense[rows],
                                          _as_queries([bank._sparse_docs[i] for i in rows]),
                                          semantic)
        fold_routes = {route: i for i, route in enumerate(fold_bank.route_ids)}
        for column, row in enumerate(rows):
            route = bank.route_ids[bank.route_of[row]]
            if route in fold_routes:
                same = fold_bank.route_of == fold_routes[route]
                nearest.append(float(blended[same, column].max()))
    if len(nearest) < MIN_CALIBRATION_ROWS:
        return 0.0
    return float(np.percentile(nearest, EVIDENCE_FLOOR_PERCENTILE))


def _as_queries(documents: Sequence[SparseVector]) -> list[SparseVector]:
    """Held-out utterances as sparse queries: their terms, each counted once."""
    return [SparseVector(d.indices, tuple(1.0 for _ in d.indices)) for d in documents]


def _payload_entry(payload: dict[str, Any]) -> BankEntry:
    return BankEntry(
        payload["route_id"],
        payload["source"],
        int(payload["index"]),
        payload["text_sha256"],
        payload.get("provenance", ""),
    )


def _scroll_all(client: QdrantClient, collection: str, with_vectors: bool
                ) -> Iterator[models.Record]:
    if not client.collection_exists(collection):
        raise LookupError(
            f"route bank collection {collection!r} does not exist; run `routemesh bank build`"
        )
    offset = None
    while True:
        points, offset = client.scroll(
            collection, limit=1024, offset=offset, with_payload=True, with_vectors=with_vectors
        )
        yield from points
        if offset is None:
            return


def _bank_identity(
    entries: Sequence[BankEntry], encoders: set[str], collection: str, semantic: SemanticConfig
) -> tuple[str, str]:
    if not entries:
        raise LookupError(f"route bank collection {collection!r} is empty")
    if len(encoders) != 1:
        raise ValueError(f"collection {collection!r} mixes encoders: {sorted(encoders)}")
    (encoder_name,) = encoders
    return encoder_name, utterances_sha256(entries, encoder_name, semantic.bm25_k1, semantic.bm25_b)


def _required_model(client: QdrantClient, collection: str) -> RouteModel:
    model = _load_model(client, collection)
    if model is None:
        raise LookupError(f"route bank collection {collection!r} has no route model; "
                          "run `routemesh bank build`")
    return model


def load_snapshot(
    client: QdrantClient, collection: str, semantic: SemanticConfig, require_model: bool = True
) -> RouteBank:
    """Read every point of the collection, and the route model, into a RouteBank."""
    entries: list[BankEntry] = []
    dense_rows: list[object] = []
    sparse_docs: list[SparseVector] = []
    encoders: set[str] = set()
    for point in _scroll_all(client, collection, with_vectors=True):
        entries.append(_payload_entry(point.payload or {}))
        encoders.add((point.payload or {})["encoder"])
        vectors = point.vector
        assert isinstance(vectors, dict)
        dense = vectors[DENSE]
        sv = vectors.get(SPARSE)
        assert isinstance(dense, list)
        assert sv is None or isinstance(sv, models.SparseVector)
        dense_rows.append(dense)
        sparse_docs.append(
            SparseVector(tuple(sv.indices), tuple(sv.values)) if sv else SparseVector((), ())
        )
    encoder_name, sha = _bank_identity(entries, encoders, collection, semantic)
    model = _required_model(client, collection) if require_model else None
    return RouteBank(entries, np.asarray(dense_rows, dtype=np.float32), sparse_docs,
                     encoder_name, sha, model)


class QdrantMatcher(Matcher):
    """Scores in Qdrant: dense and sparse prefetches, blended by a server-side formula.

    For banks too large for memory. Aggregations see the candidates only (the union of
    the dense and sparse top ``semantic.candidates``), so rare disagreements with the
    snapshot are possible; the eval reports the agreement rate. The logistic head and the
    centroid scoring read the query's vector alone and decide exactly as the snapshot.
    """

    def __init__(self, client: QdrantClient, collection: str, semantic: SemanticConfig):
        self.client = client
        self.collection = collection
        entries, encoders = [], set()
        sums: dict[str, np.ndarray] = {}
        for point in _scroll_all(client, collection, with_vectors=True):
            entry = _payload_entry(point.payload or {})
            entries.append(entry)
            encoders.add((point.payload or {})["encoder"])
            vectors = point.vector
            assert isinstance(vectors, dict)
            vector = np.asarray(vectors[DENSE], dtype=np.float32)
            sums[entry.route_id] = sums.get(entry.route_id, 0) + vector
        self.encoder_name, self.utterances_sha256 = _bank_identity(entries, encoders,
                                                                   collection, semantic)
        self.model = _required_model(client, collection)
        self.sha256 = route_bank_sha256(self.utterances_sha256, self.model)
        self.route_ids = list(self.model.routes)
        # Streamed, a route at a time: the bank itself need not fit in memory.
        centroids = np.asarray([sums[r] for r in self.route_ids], dtype=np.float32)
        self.centroids = centroids / np.maximum(
            np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)

    def match(
        self, dense: np.ndarray, sparse: SparseVector, semantic: SemanticConfig
    ) -> list[RouteMatch]:
        w = semantic.dense_weight
        squashed = models.DivExpression(
            div=models.DivParams(
                left="$score[1]",
                right=models.SumExpression(sum=["$score[1]", semantic.sparse_scale]),
                by_zero_default=0.0,
            )
        )
        formula = models.SumExpression(
            sum=[
                models.MultExpression(mult=[w, "$score[0]"]),
                models.MultExpression(mult=[1 - w, squashed]),
            ]
        )
        k = semantic.candidates
        result = self.client.query_points(
            self.collection,
            prefetch=[
                models.Prefetch(query=dense.tolist(), using=DENSE, limit=k),
                models.Prefetch(query=_qdrant_sparse(sparse), using=SPARSE, limit=k),
            ],
            query=models.FormulaQuery(
                formula=formula, defaults={"$score[0]": 0.0, "$score[1]": 0.0}
            ),
            limit=2 * k,
            with_payload=True,
        )
        by_route: dict[str, list[float]] = {route: [] for route in self.route_ids}
        nearest: dict[str, BankEntry] = {}
        for point in result.points:
            payload = point.payload or {}
            route_id = payload["route_id"]
            if route_id not in by_route:
                continue
            by_route[route_id].append(float(point.score))
            nearest.setdefault(route_id, _payload_entry(payload))
        # A route without a candidate scores as the floor of the blended scale.
        blended = [np.asarray(by_route[r] or [0.0])[:, None] for r in self.route_ids]
        raw = _raw_scores(self.model, self.route_ids, blended, dense[None, :], self.centroids)
        probabilities = softmax(raw, self.model.temperature)[0]
        evidence = [(nearest.get(r), by_route[r][0] if by_route[r] else 0.0,
                     float("nan"), float("nan")) for r in self.route_ids]
        return _ranked(self.route_ids, probabilities, evidence)
