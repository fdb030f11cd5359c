"""Assemble a Router from a config and a Qdrant location: the one way the gateway, the
command line and the benches get one."""

from __future__ import annotations

import logging
from pathlib import Path

from qdrant_client import QdrantClient

from routemesh.services.router.bank import (
    BuildReport,
    Matcher,
    QdrantMatcher,
    TrainingSet,
    build_bank,
    config_utterances_sha256,
    default_collection,
    limit_blas_threads,
    load_snapshot,
    model_inputs_sha256,
    text_sha256,
)
from routemesh.services.router.cascade import Router
from routemesh.services.router.config import LoadedConfig, load_config
from routemesh.services.router.datasets import DatasetError, file_sha256, load_dataset
from routemesh.services.router.encoders import (
    CachingEncoder,
    DenseEncoder,
    build_dense_encoder,
)

log = logging.getLogger(__name__)


class StaleBankError(RuntimeError):
    pass


def open_qdrant(url: str | None = None, path: Path | None = None, api_key: str | None = None
                ) -> QdrantClient:
    """A Qdrant server by URL, local mode on disk by path, or in memory if neither."""
    if url:
        return QdrantClient(url=url, api_key=api_key)
    if path:
        path.mkdir(parents=True, exist_ok=True)
        return QdrantClient(path=str(path))
    return QdrantClient(":memory:")


def load_router(
    config: Path | str | LoadedConfig,
    *,
    qdrant: QdrantClient | None = None,
    encoder: DenseEncoder | None = None,
    backend: str | None = None,
    instance: str = "",
    autobuild: bool = False,
    current: Router | None = None,
    embedding_cache: int = 0,
) -> Router:
    """Without ``qdrant`` the bank is built in memory from the config; with it, the bank
    must already be built (``routemesh bank build``) and match the config, unless
    ``autobuild`` builds (or refreshes) it first. A ``current`` router's encoder is kept
    when the encoder config did not change: a reload that only edits routes need not
    load a model again (nor lose its cache). An encoder built here keeps the vectors of
    the last ``embedding_cache`` distinct texts (0: none)."""
    limit_blas_threads()
    loaded = config if isinstance(config, LoadedConfig) else load_config(config)
    if encoder is None and current is not None and current.encoder is not None and (
        current.config.encoder == loaded.config.encoder
    ):
        encoder = current.encoder
    if encoder is None:
        encoder = build_dense_encoder(loaded.config.encoder)
        if embedding_cache:
            encoder = CachingEncoder(encoder, embedding_cache)
    collection = default_collection(loaded)
    if qdrant is None:
        qdrant = QdrantClient(":memory:")
        build_bank(loaded, encoder, qdrant, collection)
    try:
        return _assemble(loaded, qdrant, encoder, collection, backend, instance)
    except (LookupError, StaleBankError):
        if not autobuild:
            raise
    report = build_bank(loaded, encoder, qdrant, collection)
    log.info("route bank built", extra={"embedded": report.embedded, "kept": report.kept})
    return _assemble(loaded, qdrant, encoder, collection, backend, instance)


def _assemble(
    loaded: LoadedConfig,
    qdrant: QdrantClient,
    encoder: DenseEncoder,
    collection: str,
    backend: str | None,
    instance: str,
) -> Router:
    matcher: Matcher
    if (backend or loaded.config.bank.backend) == "qdrant":
        matcher = QdrantMatcher(qdrant, collection, loaded.config.semantic)
    else:
        matcher = load_snapshot(qdrant, collection, loaded.config.semantic)
    expected = config_utterances_sha256(loaded, encoder.name)
    if matcher.utterances_sha256 != expected:
        raise StaleBankError(
            f"the route bank in collection {collection!r} does not match {loaded.source} "
            f"(bank {matcher.utterances_sha256[:12]}, config wants {expected[:12]}); "
            "run `routemesh bank build`"
        )
    wanted = model_inputs_sha256(expected, loaded.config.semantic, matcher.model.train_sha256)
    if matcher.model.inputs_sha256 != wanted:
        raise StaleBankError(
            f"the route model in collection {collection!r} was fitted for other scoring "
            f"settings than {loaded.source}'s; run `routemesh bank build`"
        )
    return Router(loaded, matcher, encoder, instance=instance)


def build_route_bank(
    loaded: LoadedConfig,
    qdrant: QdrantClient,
    collection: str | None = None,
    train: Path | None = None,
) -> BuildReport:
    """Embed the config's utterances into Qdrant with the encoder it names and fit its
    route model (``routemesh bank build``); an unchanged bank re-embeds nothing. ``train``
    is a labelled set (the eval format) that trains the head too."""
    encoder = build_dense_encoder(loaded.config.encoder)
    training = training_set(train, loaded, encoder) if train is not None else None
    return build_bank(loaded, encoder, qdrant, collection or default_collection(loaded),
                      train=training)


def training_set(path: Path, loaded: LoadedConfig, encoder: DenseEncoder) -> TrainingSet:
    items = load_dataset(path)
    routes = {route.id for route in loaded.config.routes}
    unknown = sorted({item.route for item in items} - routes)
    if unknown:
        raise DatasetError(f"{path.name}: labels that are no route of the config: {unknown}")
    texts = [item.request.match_text(loaded.config.semantic.match_text) for item in items]
    return TrainingSet(vectors=encoder.encode(texts), routes=tuple(i.route for i in items),
                       text_sha256=tuple(sorted({text_sha256(t) for t in texts})),
                       sha256=file_sha256(path))
