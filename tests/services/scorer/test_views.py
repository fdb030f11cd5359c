import pytest

from routemesh.services.scorer.views import feedback, semantic_of, view

from .events import decided, outcome, ruled


@pytest.mark.parametrize(("decision", "reported", "classes"), [
    # Accepted and right.
    (decided("r", "deep", 0.8), outcome("r", "deep"), ("correct_routing",)),
    # Accepted above the threshold but wrong: the threshold was too low.
    (decided("r", "deep", 0.8), outcome("r", "lite"), ("threshold_too_low",)),
    # Fell back below the threshold, and the top route was right: too high.
    (decided("r", "deep", 0.5), outcome("r", "deep"), ("threshold_too_high",)),
    # Fell back below the threshold, and the fallback was right.
    (decided("r", "deep", 0.5), outcome("r", "lite"), ("correct_routing",)),
    # Without the expected route: the fallback served was wrong, the top route unknown.
    (decided("r", "deep", 0.5), outcome("r", correct=False), ()),
    # The fallback served was right, so the top route was not: nothing about the threshold.
    (decided("r", "deep", 0.5), outcome("r", correct=True), ("correct_routing",)),
    # Stopped by the margin above the threshold: no threshold moves it.
    (decided("r", "deep", 0.8, margin=0.01), outcome("r", "deep"), ()),
    # A rule decided: right, and nothing about thresholds.
    (ruled("r", "deep"), outcome("r", "deep"), ("correct_routing",)),
    # The outcome says nothing about the route.
    (decided("r", "deep", 0.8), outcome("r"), ()),
])
def test_each_feedback_class(decision, reported, classes):
    assert feedback(view(decision), view(reported)) == classes


def test_semantic_evidence_comes_from_the_semantic_attempt():
    semantic = semantic_of(view(decided("r", "deep", 0.5)))
    assert (semantic.top_route, semantic.score, semantic.threshold) == ("deep", 0.5, 0.6)
    assert (semantic.accepted, semantic.movable) == (False, True)
    assert semantic_of(view(ruled("r", "deep"))) is None
