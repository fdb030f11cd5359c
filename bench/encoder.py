"""The serving encoder against sentence-transformers running the same ONNX file.

    python bench/encoder.py [--bank-size 10000] [--texts 400]

One run, one thread per ONNX Runtime session for both (as the gateway runs it). The
baseline is sentence-transformers' own ONNX backend over the exported model
(``routemesh encoder export``): what serving would be with sentence-transformers, and
torch, in the image. The candidate is the serving path (``LocalEncoder("onnx")``:
tokenizers, ONNX Runtime and numpy). Prints:

- single-text encode latency p50/p95/p99 of each, measured alternately on the shipped
  eval prompts, and the ratio candidate / baseline;
- the largest absolute difference between their vectors over the eval prompts and the
  bench bank's utterances (bench/decision.py's ``--bank-size`` variants);
- how many decisions differ on both shipped eval sets, with routers built from the
  shipped configs and from the bench bank by each encoder.

Targets: ratio <= 0.85; largest difference <= 1e-5; no decision differs.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from decision import big_bank

from routemesh.services.router import LoadedConfig, load_config, load_dataset, load_router
from routemesh.services.router.bank import limit_blas_threads
from routemesh.services.router.encoders import (
    ENCODE_CHUNK,
    DenseEncoder,
    LocalEncoder,
    default_model_dir,
    export_model,
)
from routemesh.services.runtime.stats import Percentiles

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"
SETS = (("lite-deep.yaml", "lite-deep.eval.jsonl"), ("multi-route.yaml", "multi-route.eval.jsonl"))


class SentenceTransformersOnnx:
    """sentence-transformers' ONNX backend over the same exported file, one thread."""

    dim = 384
    batch_hint = ENCODE_CHUNK
    parallel_calls = 1

    def __init__(self, exported: Path) -> None:
        import onnxruntime
        from sentence_transformers import SentenceTransformer

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.name = "sentence-transformers:onnx"
        self._model = SentenceTransformer(
            str(exported), device="cpu", backend="onnx", local_files_only=True,
            model_kwargs={"file_name": "onnx/model.onnx", "session_options": options,
                          "provider": "CPUExecutionProvider"})

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors: np.ndarray = self._model.encode(
            list(texts), batch_size=ENCODE_CHUNK, convert_to_numpy=True,
            normalize_embeddings=True, show_progress_bar=False)
        return vectors.astype(np.float32)


def single_text_ms(encoders: Sequence[DenseEncoder], texts: list[str]) -> list[list[float]]:
    """Each text through each encoder in turn, so both see the same machine moments."""
    timings: list[list[float]] = [[] for _ in encoders]
    for text in texts:
        for i, encoder in enumerate(encoders):
            t0 = time.perf_counter()
            encoder.encode([text])
            timings[i].append((time.perf_counter() - t0) * 1000)
    return timings


def differing_decisions(configs: Sequence[LoadedConfig], dataset: Path,
                        baseline: DenseEncoder, candidate: DenseEncoder) -> tuple[int, int]:
    items = load_dataset(dataset)
    differ = 0
    for loaded in configs:
        before = load_router(loaded, encoder=baseline)
        after = load_router(loaded, encoder=candidate)
        differ += sum(before.decide(item.request, "b").route_id
                      != after.decide(item.request, "a").route_id for item in items)
    return differ, len(items) * len(configs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank-size", type=int, default=10_000)
    parser.add_argument("--texts", type=int, default=400)
    args = parser.parse_args()

    limit_blas_threads()
    exported = export_model(default_model_dir(), int8=False)
    baseline = SentenceTransformersOnnx(exported)
    candidate = LocalEncoder("onnx", threads=1)

    items = list(itertools.chain.from_iterable(
        load_dataset(EXAMPLES / dataset) for _, dataset in SETS))
    prompts = [item.request.match_text("last_user") for item in items]
    texts = [prompts[i % len(prompts)] for i in range(args.texts)]
    single_text_ms([baseline, candidate], texts[:20])
    before_ms, after_ms = single_text_ms([baseline, candidate], texts)
    before, after = Percentiles.of(before_ms), Percentiles.of(after_ms)
    ratio = statistics.median(after_ms) / statistics.median(before_ms)

    bench = big_bank(args.bank_size)
    compared = prompts + [u.text for u in bench.utterances]
    largest = max(
        float(np.abs(baseline.encode(compared[start : start + 256])
                     - candidate.encode(compared[start : start + 256])).max())
        for start in range(0, len(compared), 256))

    print(f"single-text encode ms, {len(texts)} eval prompts, one thread each")
    for name, p in (("sentence-transformers onnx", before), ("serving (direct)", after)):
        print(f"  {name:<28} p50 {p.p50:.3f}  p95 {p.p95:.3f}  p99 {p.p99:.3f}")
    print(f"  ratio serving / sentence-transformers, medians: {ratio:.2f}")
    print(f"largest |difference| over {len(compared):,} texts: {largest:.2e}")
    decisions_ok = True
    for config, dataset in SETS:
        differ, total = differing_decisions(
            [load_config(EXAMPLES / config), bench], EXAMPLES / dataset, baseline, candidate)
        decisions_ok = decisions_ok and differ == 0
        print(f"{dataset}: {differ} of {total} decisions differ "
              f"(routers from {config} and the {len(bench.utterances):,}-utterance bench bank)")
    targets = [("ratio <= 0.85", ratio <= 0.85), ("difference <= 1e-5", largest <= 1e-5),
               ("no decision differs", decisions_ok)]
    print("targets: " + ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in targets))


if __name__ == "__main__":
    main()
