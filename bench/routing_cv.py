"""How well each route scoring generalises, measured where it is not flattered.

    python bench/routing_cv.py [--encoder-backend onnx]

For both shipped configs and every scoring (the logistic head, and the centroid, top-k
mean and max aggregations), one run with the real MiniLM encoder:

- cross-validation on the configs' own utterances, five folds that hold out whole
  paraphrase groups (utterances of a route that say nearly the same thing go to the same
  fold): accuracy, macro-F1 and expected calibration error of the out-of-fold route
  probabilities. This is what chooses the shipped defaults;
- the accuracy on the shipped eval sets, which were written next to the utterances and
  flatter every choice: printed beside, never used to choose;
- for the default scoring, the full decision (threshold, margin, fallback to the default
  route) over a grid of thresholds and margins, out of fold: what the shipped thresholds
  and margins were chosen from;
- with another encoder than the default float one: its vectors' cosine to the float ones
  on the eval prompts, how many eval prompts the shipped configs route differently with
  it, and both encoders' rate on those prompts, measured in the same run.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib.metadata
import io
import time
from pathlib import Path
from typing import get_args

import msgspec
import numpy as np
from qdrant_client import QdrantClient

from routemesh.services.router import (
    EncoderBackend,
    EncoderConfig,
    LoadedConfig,
    Router,
    RouteRequest,
    load_config,
    load_dataset,
)
from routemesh.services.router.bank import (
    RouteBank,
    build_bank,
    cross_validation,
    fit_model,
    limit_blas_threads,
    load_snapshot,
    text_sha256,
    utterances_sha256,
)
from routemesh.services.router.config import canonical_sha256
from routemesh.services.router.encoders import LocalEncoder, SparseEncoder
from routemesh.services.router.evaluate import SCORINGS, evaluate
from routemesh.services.router.scoring import reliability, softmax

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"
SETS = [("lite-deep.yaml", "lite-deep.eval.jsonl"), ("multi-route.yaml", "multi-route.eval.jsonl")]
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MARGINS = (0.0, 0.02, 0.05, 0.1, 0.2)


def snapshot(loaded: LoadedConfig, encoder: LocalEncoder) -> RouteBank:
    texts = [u.text for u in loaded.utterances]
    semantic = loaded.config.semantic
    sparse = SparseEncoder(semantic.bm25_k1, semantic.bm25_b).fit(texts)
    from routemesh.services.router.bank import BankEntry

    entries = [BankEntry(u.route_id, u.source, u.index, text_sha256(u.text), u.provenance)
               for u in loaded.utterances]
    return RouteBank(entries, encoder.encode(texts), [sparse.document(t) for t in texts],
                     encoder.name, utterances_sha256(entries, encoder.name, semantic.bm25_k1,
                                               semantic.bm25_b))


def shipped_router(loaded: LoadedConfig, encoder: LocalEncoder) -> Router:
    """The config as a gateway serves it: its bank built and loaded the product's way."""
    client = QdrantClient(":memory:")
    build_bank(loaded, encoder, client, "bench")
    return Router(loaded, load_snapshot(client, "bench", loaded.config.semantic), encoder)


def against_float(loaded: LoadedConfig, items: list, encoder: LocalEncoder,
                  reference: LocalEncoder) -> None:
    texts = [item.request.match_text("last_user") for item in items]

    def timed(each: LocalEncoder) -> tuple[np.ndarray, float]:
        each.encode(texts)
        started = time.perf_counter()
        vectors = each.encode(texts)
        return vectors, len(texts) / (time.perf_counter() - started)

    (ours, rate), (theirs, float_rate) = timed(encoder), timed(reference)
    cosine = np.sum(ours * theirs, axis=1)
    decided = [evaluate(shipped_router(loaded, each), items, "bench").decisions
               for each in (encoder, reference)]
    differ = sum(decided[0][key] != decided[1][key] for key in decided[0])
    print(f"against the float encoder: cosine mean {cosine.mean():.4f}, lowest "
          f"{cosine.min():.4f}; {differ} of {len(items)} eval prompts routed differently; "
          f"{rate:.0f} texts/s against {float_rate:.0f} (eval prompts, "
          f"{EncoderConfig().threads} threads)")


def documents() -> dict[str, str]:
    """Texts pasted around a question, none of them in a file of ours: numpy's licence
    (neutral for every shipped route), and the Zen of Python twice (about code, so a
    document a coding or deep route claims for itself)."""
    numpy = importlib.metadata.distribution("numpy")
    licence = next(f for f in numpy.files or () if f.name == "LICENSE.txt")
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # it prints the text when imported
    return {"licence": licence.read_text()[:1500],
            "zen": "\n\n".join([codecs.decode(this.s, "rot13")] * 2)}


def long_prompts(loaded: LoadedConfig, items: list, encoder: LocalEncoder) -> None:
    """Each eval prompt alone, after a document and before it: the whole decision (the
    text and its edge paragraphs ranked, the most confident taken) against the whole
    text's top route alone, as the semantic layer ranked before paragraphs."""
    router = shipped_router(loaded, encoder)
    prompts = [i for i in items if len(i.request.messages) == 1]
    forms = [("alone", lambda p: p)] + [
        (f"{name} {where}", wrap) for name, text in documents().items()
        for where, wrap in (("then question", lambda p, t=text: f"{t}\n\n{p}"),
                            ("after question", lambda p, t=text: f"{p}\n\n{t}"))]
    for name, wrap in forms:
        requests = [(RouteRequest.from_text(wrap(i.request.messages[-1][1])), i.id)
                    for i in prompts]
        decided = router.decide_many(requests)
        whole = router._rank_batch([r.match_text("last_user") for r, _ in requests])
        print(f"  {name:<25} decision {_share([d.route_id for d in decided], prompts):.3f}"
              f", whole text only {_share([w[0].route_id for w in whole], prompts):.3f}")


def _share(routes: list[str], items: list) -> float:
    return sum(r == i.route for r, i in zip(routes, items, strict=True)) / len(items)


def variant(loaded: LoadedConfig, head: str, aggregation: str) -> LoadedConfig:
    semantic = msgspec.structs.replace(loaded.config.semantic, head=head,
                                       aggregation=aggregation)
    config = msgspec.structs.replace(loaded.config, semantic=semantic)
    return LoadedConfig(config, loaded.source, canonical_sha256(config), loaded.utterances,
                        loaded.files)


def macro_f1(predicted: np.ndarray, truth: np.ndarray, routes: int) -> float:
    scores = []
    for r in range(routes):
        tp = np.sum((predicted == r) & (truth == r))
        fp, fn = np.sum((predicted == r) & (truth != r)), np.sum((predicted != r) & (truth == r))
        if tp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder-backend", default=EncoderConfig().backend,
                        choices=get_args(EncoderBackend))
    args = parser.parse_args()
    limit_blas_threads()
    encoder = LocalEncoder(args.encoder_backend)
    reference = LocalEncoder(EncoderConfig().backend) \
        if args.encoder_backend != EncoderConfig().backend else None
    for config_name, dataset_name in SETS:
        loaded = load_config(EXAMPLES / config_name)
        items = load_dataset(EXAMPLES / dataset_name)
        bank = snapshot(loaded, encoder)
        print(f"\n{config_name}: {len(bank)} utterances, {len(bank.route_ids)} routes; "
              f"eval set {dataset_name}: {len(items)} prompts")
        print(f"{'scoring':<15}{'cv acc':>8}{'cv F1':>8}{'cv ECE':>8}{'groups':>8}"
              f"{'T':>8}{'fit s':>8}{'eval acc':>10}{'eval ECE':>10}")
        for name, head, aggregation in SCORINGS:
            scored = variant(loaded, head, aggregation)
            semantic = scored.config.semantic
            started = time.perf_counter()
            model = fit_model(bank, semantic)
            fit_s = time.perf_counter() - started
            cv = cross_validation(bank, semantic)
            raw, truth = cv.scores(model.head.c if model.head else 1.0)
            p = softmax(raw, model.temperature)
            predicted = p.argmax(axis=1)
            _, ece = reliability(p.max(axis=1), predicted == truth)
            bank.use(model)
            report = evaluate(Router(scored, bank, encoder), items, "bench")
            print(f"{name:<15}{(predicted == truth).mean():>8.3f}"
                  f"{macro_f1(predicted, truth, len(bank.route_ids)):>8.3f}{ece:>8.3f}"
                  f"{len(np.unique(cv.groups)):>8}{model.temperature:>8.3f}{fit_s:>8.2f}"
                  f"{report.accuracy:>10.3f}{report.calibration_error:>10.3f}")
            if head == loaded.config.semantic.head and (
                head == "logistic" or aggregation == loaded.config.semantic.aggregation
            ):
                default_probabilities = (p, truth)
        p, truth = default_probabilities
        default = bank.route_ids.index(loaded.config.default_route)
        top = np.sort(p, axis=1)
        order = p.argmax(axis=1)
        print(f"the default scoring's full decision out of fold (fallback to "
              f"{loaded.config.default_route!r}); shipped: threshold "
              f"{sorted({r.threshold for r in loaded.config.routes})}, margin "
              f"{loaded.config.margin}")
        print("  threshold " + "".join(f"{f'margin {m}':>13}" for m in MARGINS))
        for threshold in THRESHOLDS:
            row = []
            for margin in MARGINS:
                confident = (top[:, -1] >= threshold) & (top[:, -1] - top[:, -2] >= margin)
                decided = np.where(confident, order, default)
                row.append(f"{(decided == truth).mean():>13.3f}")
            print(f"  {threshold:>9}" + "".join(row))
        print("long prompts (a document pasted before or after each eval prompt):")
        long_prompts(loaded, items, encoder)
        if reference is not None:
            against_float(loaded, items, encoder, reference)


if __name__ == "__main__":
    main()
