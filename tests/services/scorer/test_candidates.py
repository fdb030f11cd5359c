import msgspec
import pytest

from routemesh.services.scorer.candidates import CandidatePolicy, candidate, clusters, ranked
from routemesh.services.scorer.views import view

from .events import decided, observed, outcome, ruled

POLICY = CandidatePolicy(threshold_band=0.05, margin_band=0.02, slow_ms=30_000)


def reasons(decision, observation=None, reported=None):
    found = candidate(view(decision), observation and view(observation),
                      reported and view(reported), POLICY)
    return found.reasons if found else ()


@pytest.mark.parametrize(("decision", "observation", "reported", "expected"), [
    (decided("r", "deep", 0.9), None, None, ()),
    (decided("r", "deep", 0.3), None, None, ("low_confidence",)),
    (decided("r", "deep", 0.3, reason="embedding_error", layer="fallback"), None, None,
     ("embedding_error",)),
    (decided("r", "deep", 0.9), observed("r", error="UpstreamTimeout", status=None), None,
     ("route_error",)),
    (decided("r", "deep", 0.9), observed("r", status=503), None, ("upstream_non_2xx",)),
    (decided("r", "deep", 0.63), None, None, ("near_threshold",)),
    (decided("r", "deep", 0.9, margin=0.06), None, None, ("near_margin",)),
    (decided("r", "deep", 0.9), observed("r", duration_ms=45_000), None, ("slow",)),
    (decided("r", "deep", 0.9), None, outcome("r", completion_time_s=60), ("slow",)),
    (decided("r", "deep", 0.9), None, outcome("r", "lite"), ("wrong_route",)),
    (ruled("r", "deep"), None, outcome("r", correct=False), ("wrong_route",)),
    # Every reason it qualifies for, not just the first.
    (decided("r", "deep", 0.58, margin=0.04), observed("r", status=500),
     outcome("r", "deep"),
     ("low_confidence", "upstream_non_2xx", "near_threshold", "near_margin", "wrong_route")),
])
def test_each_reason(decision, observation, reported, expected):
    assert reasons(decision, observation, reported) == expected


def test_candidates_carry_metadata_and_never_text():
    found = candidate(view(decided("r", "deep", 0.62)), None, None, POLICY)
    assert (found.route_id, found.top_route_id, found.second_route_id) == ("deep", "deep", "lite")
    assert (found.match_source, found.match_index, found.match_text_sha256) == (
        "lite-deep/lite.txt", 3, "a" * 64)
    assert found.cluster
    assert len(found.cluster) == 16


def test_clusters_group_shared_metadata_and_rank_by_size():
    near = [candidate(view(decided(f"n{i}", "deep", 0.62)), None, None, POLICY)
            for i in range(5)]
    low = [candidate(view(decided(f"l{i}", "math", 0.2, second="deep")), None, None, POLICY)
           for i in range(2)]
    odd = candidate(view(decided("x", "deep", 0.62, match_index=9)), None, None, POLICY)
    found = clusters(near + low + [odd])
    assert [(c.reason, c.size) for c in found] == [
        ("near_threshold", 5), ("low_confidence", 2), ("near_threshold", 1)]
    assert found[0].example_request_ids == ("n0", "n1", "n2", "n3", "n4")
    assert found[2].match_index == 9
    assert [c.request_id for c in ranked(near + low + [odd], 6)] == [
        "n0", "n1", "n2", "n3", "n4", "l0"]


def test_clusters_split_by_the_decisions_own_reason():
    """The same route and evidence, decided by the semantic layer once and by a rule
    once, are different things for a reviewer to look at."""
    semantic = candidate(view(decided("s", "deep", 0.62)), None, None, POLICY)
    ruled_alike = msgspec.structs.replace(semantic, request_id="r", decision_reason="rule")
    found = clusters([semantic, ruled_alike])
    assert sorted((c.decision_reason, c.size) for c in found) == [("rule", 1), ("semantic", 1)]
