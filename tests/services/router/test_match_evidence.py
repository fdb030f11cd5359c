"""The head and centroid scorings read only the top route's rows for its evidence: the
evidence (and so every decision) is what the whole bank gives, on the shipped banks and
on bench/decision.py's 10,000-utterance bank, batched and alone."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from routemesh.services.router import load_config, load_dataset, load_router
from routemesh.services.router.encoders import SparseEncoder

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "deploy" / "examples"


def _bench_bank(size: int):
    spec = importlib.util.spec_from_file_location("bench_decision", ROOT / "bench" /
                                                  "decision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.big_bank(size)


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("bank", ["lite-deep", "multi-route", "bench-10k"])
def test_the_top_routes_evidence_is_the_whole_banks(bank):
    example = "lite-deep" if bank == "bench-10k" else bank
    loaded = _bench_bank(10_000) if bank == "bench-10k" else \
        load_config(EXAMPLES / f"{example}.yaml")
    router = load_router(loaded)
    matcher, semantic = router.matcher, loaded.config.semantic
    assert matcher.model.scoring == "logistic"
    texts = [item.request.match_text(semantic.match_text)
             for item in load_dataset(EXAMPLES / f"{example}.eval.jsonl")]
    dense = router.encoder.encode(texts)
    sparse = [SparseEncoder.query(text) for text in texts]
    batched = matcher.match_many(dense, sparse, semantic)
    whole, _, _ = matcher.blended(dense, sparse, semantic)
    for column, ranking in enumerate(batched):
        top = ranking[0]
        route = matcher.route_ids.index(top.route_id)
        start, stop = matcher._route_starts[route], matcher._route_stops[route]
        row = start + int(np.argmax(whole[start:stop, column]))
        assert top.entry == matcher.entries[row], texts[column][:60]
        assert top.match_score == pytest.approx(float(whole[row, column]), abs=1e-6)
        alone = matcher.match(dense[column], sparse[column], semantic)[0]
        assert (alone.route_id, alone.entry) == (top.route_id, top.entry)
        assert alone.score == pytest.approx(top.score, abs=1e-9)
