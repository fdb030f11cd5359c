"""The route bank: utterances embedded into Qdrant (named dense + sparse vectors), an
in-memory snapshot for the hot path, and a back-end that queries Qdrant directly.

Both back-ends score an utterance the same way:

    blended = w * cosine(dense) + (1 - w) * s / (s + scale),  s = BM25 (IDF at query time)

and a route's score is its best utterance's. The snapshot scores every utterance; the
Qdrant back-end scores the union of the dense and sparse top candidates server-side.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from qdrant_client import QdrantClient, models
from threadpoolctl import threadpool_limits

from routemesh.services.router.config import LoadedConfig, SemanticConfig, Utterance
from routemesh.services.router.encoders import DenseEncoder, SparseEncoder, SparseVector, idf

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


def bank_sha256(entries: Sequence[BankEntry], encoder_name: str, k1: float, b: float) -> str:
    """Identifies the bank's content and how it was encoded, independent of order."""
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


def config_bank_sha256(loaded: LoadedConfig, encoder_name: str) -> str:
    """The bank sha256 that building ``loaded`` with this encoder gives."""
    semantic = loaded.config.semantic
    entries = [_entry(u) for u in loaded.utterances]
    return bank_sha256(entries, encoder_name, semantic.bm25_k1, semantic.bm25_b)


def default_collection(loaded: LoadedConfig) -> str:
    return loaded.config.bank.collection or "routemesh-routes"


def build_bank(
    loaded: LoadedConfig,
    encoder: DenseEncoder,
    client: QdrantClient,
    collection: str | None = None,
    batch_size: int = 64,
) -> BuildReport:
    """Upsert every utterance; embed only those not already stored for this encoder."""
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
    return BuildReport(
        collection,
        embedded=len(missing),
        removed=len(stale),
        kept=len(kept),
        sha256=config_bank_sha256(loaded, encoder.name),
        encoder=encoder.name,
    )


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
    route_id: str
    score: float
    entry: BankEntry
    dense: float
    sparse: float


class Matcher:
    """What the cascade needs from a bank: ranked route scores for a query."""

    sha256: str
    encoder_name: str

    def match(
        self, dense: np.ndarray, sparse: SparseVector, semantic: SemanticConfig
    ) -> list[RouteMatch]:
        raise NotImplementedError

    def match_many(
        self, dense: np.ndarray, sparse: Sequence[SparseVector], semantic: SemanticConfig
    ) -> list[list[RouteMatch]]:
        """One ranking per row of ``dense``."""
        return [self.match(row, query, semantic) for row, query in zip(dense, sparse, strict=True)]


class RouteBank(Matcher):
    """The in-memory snapshot: a dense matrix and a sparse inverted index."""

    def __init__(
        self,
        entries: Sequence[BankEntry],
        dense: np.ndarray,
        sparse_docs: Sequence[SparseVector],
        encoder_name: str,
        sha256: str,
    ) -> None:
        order = sorted(range(len(entries)), key=lambda i: (entries[i].route_id, i))
        self.entries = [entries[i] for i in order]
        self.dense = np.ascontiguousarray(dense[order], dtype=np.float32)
        self.encoder_name = encoder_name
        self.sha256 = sha256
        self.route_ids = sorted({e.route_id for e in self.entries})
        route_of = np.array([self.route_ids.index(e.route_id) for e in self.entries])
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

    def __len__(self) -> int:
        return len(self.entries)

    def match(
        self, dense: np.ndarray, sparse: SparseVector, semantic: SemanticConfig
    ) -> list[RouteMatch]:
        return self.match_many(dense[None, :], [sparse], semantic)[0]

    def match_many(
        self, dense: np.ndarray, sparse: Sequence[SparseVector], semantic: SemanticConfig
    ) -> list[list[RouteMatch]]:
        # One matrix product for the whole batch: far cheaper than a product per query.
        # A lone query takes the matrix-vector path, whose tail on a large bank is well
        # below a one-column matrix product's (bench/decision.py, match only).
        cosine = (self.dense @ dense[0])[:, None] if len(dense) == 1 else self.dense @ dense.T
        bm25 = np.zeros_like(cosine)
        for column, query in enumerate(sparse):
            for term in query.indices:
                posting = self._postings.get(term)
                if posting is not None:
                    bm25[posting[0], column] += posting[1]
        squashed = bm25 / (bm25 + semantic.sparse_scale)
        w = semantic.dense_weight
        blended = w * cosine + (1 - w) * squashed
        best_rows = [
            start + np.argmax(blended[start:stop], axis=0)
            for start, stop in zip(self._route_starts, self._route_stops, strict=True)
        ]
        rankings = []
        for column in range(blended.shape[1]):
            scores = [
                RouteMatch(
                    self.entries[row].route_id,
                    float(blended[row, column]),
                    self.entries[row],
                    float(cosine[row, column]),
                    float(squashed[row, column]),
                )
                for row in (int(r[column]) for r in best_rows)
            ]
            rankings.append(sorted(scores, key=lambda s: -s.score))
        return rankings


def _payload_entry(payload: dict) -> BankEntry:
    return BankEntry(
        payload["route_id"],
        payload["source"],
        int(payload["index"]),
        payload["text_sha256"],
        payload.get("provenance", ""),
    )


def _scroll_all(client: QdrantClient, collection: str, with_vectors: bool):
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
    return encoder_name, bank_sha256(entries, encoder_name, semantic.bm25_k1, semantic.bm25_b)


def load_snapshot(client: QdrantClient, collection: str, semantic: SemanticConfig) -> RouteBank:
    """Read every point of the collection into an in-memory RouteBank."""
    entries: list[BankEntry] = []
    dense_rows: list[list[float]] = []
    sparse_docs: list[SparseVector] = []
    encoders: set[str] = set()
    for point in _scroll_all(client, collection, with_vectors=True):
        entries.append(_payload_entry(point.payload or {}))
        encoders.add((point.payload or {})["encoder"])
        vectors = point.vector
        assert isinstance(vectors, dict)
        dense_rows.append(vectors[DENSE])
        sv = vectors.get(SPARSE)
        sparse_docs.append(
            SparseVector(tuple(sv.indices), tuple(sv.values)) if sv else SparseVector((), ())
        )
    encoder_name, sha = _bank_identity(entries, encoders, collection, semantic)
    return RouteBank(entries, np.asarray(dense_rows, dtype=np.float32), sparse_docs,
                     encoder_name, sha)


class QdrantMatcher(Matcher):
    """Scores in Qdrant: dense and sparse prefetches, blended by a server-side formula.

    For banks too large for memory. A candidate found by only one prefetch gets 0 for
    the other side, so rare disagreements with the snapshot are possible; the eval
    reports the agreement rate.
    """

    def __init__(self, client: QdrantClient, collection: str, semantic: SemanticConfig):
        self.client = client
        self.collection = collection
        entries, encoders = [], set()
        for point in _scroll_all(client, collection, with_vectors=False):
            entries.append(_payload_entry(point.payload or {}))
            encoders.add((point.payload or {})["encoder"])
        self.encoder_name, self.sha256 = _bank_identity(entries, encoders, collection, semantic)

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
        ranked: dict[str, RouteMatch] = {}
        for point in result.points:
            payload = point.payload or {}
            route_id = payload["route_id"]
            if route_id in ranked:
                continue
            ranked[route_id] = RouteMatch(
                route_id, float(point.score), _payload_entry(payload), float("nan"), float("nan")
            )
        return sorted(ranked.values(), key=lambda r: -r.score)
