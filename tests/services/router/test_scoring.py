"""Route scoring: calibration, paraphrase-group folds, the logistic head, and the route
model's place in the bank's identity and its determinism."""

import json

import numpy as np
import pytest
from qdrant_client import QdrantClient

from routemesh.services.router import (
    DatasetError,
    RouteRequest,
    evaluate,
    file_sha256,
    load_config,
    load_dataset,
)
from routemesh.services.router.bank import (
    QdrantMatcher,
    build_bank,
    load_snapshot,
    route_bank_sha256,
)
from routemesh.services.router.cascade import Router, segments
from routemesh.services.router.factory import training_set
from routemesh.services.router.scoring import (
    fit_temperature,
    folds,
    paraphrase_groups,
    reliability,
    softmax,
)
from tests.services.router.conftest import HashingEncoder

WORDS = {
    "cooking": "recipe bake oven flour sugar simmer sauce boil roast dough",
    "travel": "flight hotel passport visa luggage airport train ticket beach map",
    "finance": "invoice budget tax loan interest savings stock dividend payroll audit",
}


def synthetic_config(tmp_path, head: str = "logistic", extra: str = "") -> object:
    """Three routes of forty utterances each, made of each route's own words."""
    rng = np.random.default_rng(7)
    lines = ["version: 1", "default_route: cooking", "margin: 0.0",
             f"semantic: {{head: {head}, aggregation: topk_mean{extra}}}", "routes:"]
    for route, words in WORDS.items():
        vocabulary = words.split()
        path = tmp_path / f"{route}.txt"
        path.write_text("\n".join(" ".join(rng.choice(vocabulary, 4)) + f" {i}"
                                  for i in range(40)) + "\n")
        lines += [f"  - id: {route}", "    target_model: m", "    threshold: 0.5",
                  f"    utterances_file: {path.name}"]
    config = tmp_path / "routes.yaml"
    config.write_text("\n".join(lines) + "\n")
    return load_config(config)


def test_a_temperature_fitted_on_known_probabilities_calibrates_them():
    rng = np.random.default_rng(11)
    raw = rng.normal(0, 2, size=(20_000, 3))
    true = softmax(raw, 1 / 1.7)
    labels = np.array([rng.choice(3, p=p) for p in true])
    temperature = fit_temperature(raw, labels)
    assert temperature == pytest.approx(1 / 1.7, rel=0.1)
    p = softmax(raw, temperature)
    table, ece = reliability(p.max(axis=1), p.argmax(axis=1) == labels)
    for bucket in table:
        if bucket.count >= 200:
            assert abs(bucket.mean_confidence - bucket.accuracy) <= 0.1, bucket
    assert ece < 0.03
    _, uncalibrated = reliability(softmax(raw, 5.0).max(axis=1), p.argmax(axis=1) == labels)
    assert uncalibrated > 3 * ece, "the check can tell a wrong temperature"


def test_paraphrases_are_one_group_and_a_fold_never_splits_a_group():
    vectors = np.eye(6, dtype=np.float32)
    vectors[1] = vectors[0]
    vectors[2] = (vectors[0] + vectors[3]) / np.sqrt(2)
    labels = ["a", "a", "a", "b", "b", "b"]
    groups = paraphrase_groups(vectors, labels)
    assert groups[0] == groups[1] == groups[2], "1 and 2 are close to 0 (cosine 1, 0.71)"
    assert len(set(groups[3:])) == 3, "another route's vectors never join them"
    held_out = folds(groups)
    assert sorted(np.concatenate(held_out)) == list(range(6))
    for test in held_out:
        inside = set(groups[test])
        assert all(g not in inside for i, g in enumerate(groups) if i not in test)


def test_the_head_is_part_of_the_banks_identity_and_the_same_twice(tmp_path):
    loaded = synthetic_config(tmp_path)
    encoder = HashingEncoder()
    first, second = QdrantClient(":memory:"), QdrantClient(":memory:")
    report = build_bank(loaded, encoder, first, "bank")
    again = build_bank(loaded, encoder, second, "bank")
    assert report.model.scoring == "logistic"
    assert report.model.head is not None
    assert report.model.validation.accuracy > 0.9
    assert report.model == again.model, "fitted deterministically"
    assert report.sha256 == again.sha256
    other_head = type(report.model)(**{
        **{f: getattr(report.model, f) for f in report.model.__struct_fields__},
        "head": type(report.model.head)(weights=[[w + 1e-6 for w in row] for row in
                                                 report.model.head.weights],
                                        bias=report.model.head.bias, c=report.model.head.c)})
    utterances = load_snapshot(first, "bank", loaded.config.semantic).utterances_sha256
    assert route_bank_sha256(utterances, other_head) != report.sha256, (
        "the head's weights are part of the bank's identity")


def test_the_same_bank_decides_the_same_bit_for_bit_in_both_back_ends(tmp_path):
    loaded = synthetic_config(tmp_path)
    encoder = HashingEncoder()
    client = QdrantClient(":memory:")
    build_bank(loaded, encoder, client, "bank")
    memory = Router(loaded, load_snapshot(client, "bank", loaded.config.semantic), encoder)
    direct = Router(loaded, QdrantMatcher(client, "bank", loaded.config.semantic), encoder)
    again = Router(loaded, load_snapshot(client, "bank", loaded.config.semantic), encoder)
    prompts = ["bake a sauce in the oven", "book a flight and a hotel", "tax on my savings",
               "flour flight tax", "nothing in common at all"]
    for prompt in prompts:
        request = RouteRequest.from_text(prompt, "auto")
        a, b, c = (r.decide(request, "x") for r in (memory, direct, again))
        assert (a.route_id, a.reason, a.score, a.second_score) == (
            c.route_id, c.reason, c.score, c.second_score), "run to run"
        assert (a.route_id, a.score, a.second_route_id, a.second_score) == (
            b.route_id, b.score, b.second_route_id, b.second_score), "back-end to back-end"
        assert a.route_bank_sha256 == b.route_bank_sha256


@pytest.mark.parametrize("aggregation", ["max", "topk_mean", "centroid"])
def test_every_aggregation_gives_calibrated_probabilities(tmp_path, aggregation):
    loaded = synthetic_config(tmp_path, head="none")
    text = loaded.files[0].read_text().replace("aggregation: topk_mean",
                                               f"aggregation: {aggregation}")
    loaded.files[0].write_text(text)
    loaded = load_config(loaded.files[0])
    encoder = HashingEncoder()
    client = QdrantClient(":memory:")
    report = build_bank(loaded, encoder, client, "bank")
    assert report.model.scoring == aggregation
    router = Router(loaded, load_snapshot(client, "bank", loaded.config.semantic), encoder)
    decision = router.decide(RouteRequest.from_text("bake flour sugar dough", "auto"), "x")
    assert decision.route_id == "cooking"
    assert 0.0 <= decision.second_score <= decision.score <= 1.0
    ranked = router.matcher.match(encoder.encode(["bake flour sugar dough"])[0],
                                  __import__("routemesh.services.router.encoders",
                                             fromlist=["SparseEncoder"]).SparseEncoder.query(
                                      "bake flour sugar dough"), loaded.config.semantic)
    assert sum(m.score for m in ranked) == pytest.approx(1.0), "a distribution over routes"


def test_a_homogeneous_route_is_not_chained_into_one_group():
    angles = np.linspace(0, np.pi / 2, 30)
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    groups = paraphrase_groups(vectors, ["a"] * 30)
    assert len(set(groups)) == 2, "neighbours are close (3°), the ends are not (90°)"


def test_extra_training_prompts_train_the_head_and_never_reach_an_eval(tmp_path):
    loaded = synthetic_config(tmp_path)
    encoder = HashingEncoder()
    dataset = tmp_path / "reviewed.jsonl"
    rows = [{"id": f"t{i}", "prompt": f"roast the dough {i}", "route": "cooking"}
            for i in range(5)]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = training_set(dataset, loaded, encoder)
    client = QdrantClient(":memory:")
    report = build_bank(loaded, encoder, client, "bank", train=train)
    assert report.model.train_sha256 == file_sha256(dataset)
    assert len(report.model.train_text_sha256) == 5
    untrained = build_bank(loaded, encoder, QdrantClient(":memory:"), "bank").model
    assert report.model.inputs_sha256 != untrained.inputs_sha256
    assert report.sha256 != route_bank_sha256(
        load_snapshot(client, "bank", loaded.config.semantic).utterances_sha256, untrained)

    # A later build without the set (each gateway start's) keeps what the model learned
    # while it still fits the bank and the settings.
    assert build_bank(loaded, encoder, client, "bank").model == report.model

    router = Router(loaded, load_snapshot(client, "bank", loaded.config.semantic), encoder)
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text("".join(json.dumps(r) + "\n" for r in [
        *rows[:3], {"id": "e1", "prompt": "book a hotel near the airport", "route": "travel"}]))
    result = evaluate(router, load_dataset(evalset), "x")
    assert result.excluded_trained == 3, "the trained items are left out, and counted"
    assert result.items == 1
    assert set(result.decisions) == {"e1"}
    only_trained = tmp_path / "only-trained.jsonl"
    only_trained.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match="nothing left to evaluate"):
        evaluate(router, load_dataset(only_trained), "x")


def test_a_training_label_that_is_no_route_is_refused(tmp_path):
    loaded = synthetic_config(tmp_path)
    dataset = tmp_path / "reviewed.jsonl"
    dataset.write_text(json.dumps({"id": "1", "prompt": "x", "route": "large-model"}) + "\n")
    with pytest.raises(DatasetError, match=r"no route of the config: \['large-model'\]"):
        training_set(dataset, loaded, HashingEncoder())


def test_a_text_of_several_paragraphs_is_ranked_with_its_edge_paragraphs():
    assert segments("one paragraph\nand its second line") == [
        "one paragraph\nand its second line"]
    assert segments("a\n\n  \n\nb") == ["a\n\n  \n\nb", "a", "b"]
    many = "\n\n".join(f"p{n}" for n in range(7))
    assert segments(many) == [many, "p0", "p1", "p5", "p6"]
