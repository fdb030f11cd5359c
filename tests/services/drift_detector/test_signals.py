"""Each drift signal on hand-made windows: what counts, what is unknown, where it flags."""

from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ks_2samp

from routemesh.services.drift_detector import RESPONSE, ROUTING, DriftDecision, DriftObservation
from routemesh.services.drift_detector.signals import (
    ks_statistic,
    overall_verdict,
    population_stability_index,
    response_verdict,
    route_verdict,
)
from tests.services.drift_detector.streams import START

NORMAL = RESPONSE["normal"]


def obs(i: int = 0, **fields) -> DriftObservation:
    base = dict(route_id="lite", target_model="m", occurred_at=START + timedelta(seconds=i),
                upstream_status=200, completion_tokens=100, finish_reason="stop")
    base.update(fields)
    return DriftObservation(**base)


def signal(verdict, name):
    return next(s for s in verdict.signals if s.name == name)


def test_below_the_minimum_fill_the_verdict_is_insufficient_data_never_none():
    for preset, thresholds in RESPONSE.items():
        short = [obs(i, completion_tokens=0) for i in range(thresholds.min_fill - 1)]
        assert response_verdict(short, thresholds).state == "insufficient_data", preset
        full = [obs(i) for i in range(thresholds.min_fill)]
        assert response_verdict(full, thresholds).state == "none", preset


def test_empty_rate_counts_zero_token_answers_and_a_stream_without_usage_is_unknown():
    window = [obs(i, completion_tokens=0) for i in range(3)]
    window += [obs(i, stream=True, completion_tokens=None) for i in range(3, 10)]
    window += [obs(i) for i in range(10, 17)]
    verdict = response_verdict(window, NORMAL)
    # 3 empty of the 10 answers whose length is known; the 7 streams count for nothing.
    assert signal(verdict, "empty_response_rate").value == 0.3
    assert verdict.state == "severe"
    assert "empty_response_rate 0.3 at or above 0.3" in verdict.reason


def test_failed_requests_are_not_empty_answers_but_errors():
    window = [obs(i, upstream_status=502, completion_tokens=None, finish_reason=None)
              for i in range(4)] + [obs(i) for i in range(4, 20)]
    verdict = response_verdict(window, NORMAL)
    assert signal(verdict, "empty_response_rate").value == 0.0
    assert signal(verdict, "error_rate").value == 0.2
    assert verdict.state == "none"
    window[4] = obs(4, upstream_status=200, error_class="ReadTimeout")
    verdict = response_verdict(window, NORMAL)
    assert signal(verdict, "error_rate").value == 0.25
    assert verdict.state == "mild"


def test_length_collapse_compares_the_medians_of_the_window_halves():
    window = [obs(i, completion_tokens=200) for i in range(10)]
    window += [obs(i, completion_tokens=60) for i in range(10, 20)]
    verdict = response_verdict(window, RESPONSE["low"])
    assert signal(verdict, "length_collapse").value == 0.3
    assert verdict.state == "severe", "a collapse to 30 % reaches the low preset's 0.3"
    assert signal(response_verdict(window[:3], NORMAL), "length_collapse").value is None
    zero_before = [obs(i, completion_tokens=0) for i in range(4)] + window[10:]
    assert signal(response_verdict(zero_before, NORMAL), "length_collapse").value is None


def test_tool_silence_needs_three_requests_that_offered_tools():
    offered = [obs(i, tools_requested=True) for i in range(2)]
    window = offered + [obs(i) for i in range(2, 10)]
    assert signal(response_verdict(window, NORMAL), "tool_silence_rate").value is None
    window.append(obs(10, tools_requested=True, tools_used=True, finish_reason="tool_calls"))
    silence = signal(response_verdict(window, NORMAL), "tool_silence_rate")
    assert silence.value == 0.667
    assert not silence.flagged
    window.append(obs(11, tools_requested=True))
    silence = signal(response_verdict(window, NORMAL), "tool_silence_rate")
    assert silence.value == 0.75
    assert silence.flagged
    assert silence.severity == "mild"


def test_stop_anomalies_are_finish_reasons_outside_the_expected_set():
    window = [obs(i, finish_reason="content_filter") for i in range(3)]
    window += [obs(i, finish_reason=None) for i in range(3, 5)]
    window += [obs(i, finish_reason="length") for i in range(5, 10)]
    assert signal(response_verdict(window, NORMAL), "stop_anomaly_rate").value == 0.5
    own = response_verdict(window, NORMAL, frozenset({"stop", "length", "content_filter"}))
    assert signal(own, "stop_anomaly_rate").value == 0.2


def test_two_mild_signals_make_it_severe():
    window = [obs(i, finish_reason="content_filter") for i in range(5)]
    window += [obs(i, upstream_status=500, completion_tokens=None) for i in range(5, 10)]
    window += [obs(i) for i in range(10, 16)]
    verdict = response_verdict(window, NORMAL)
    assert {s.name for s in verdict.signals if s.flagged} == {"stop_anomaly_rate", "error_rate"}
    assert all(s.severity == "mild" for s in verdict.signals if s.flagged)
    assert verdict.state == "severe"


def test_values_are_rounded_to_three_decimals():
    window = [obs(i, upstream_status=500) for i in range(1)] + [obs(i) for i in range(1, 7)]
    assert signal(response_verdict(window, NORMAL), "error_rate").value == 0.143


def test_population_stability_index_bands():
    same = Counter(lite=50, deep=50)
    assert population_stability_index(same, same) == 0.0
    moderate = population_stability_index(Counter(lite=68, deep=32), same)
    major = population_stability_index(Counter(lite=85, deep=15), same)
    assert 0.1 < moderate < 0.25 < major
    # A route the baseline never saw is finite, not infinite.
    assert population_stability_index(Counter(lite=50, new=50), same) < 10


@pytest.mark.filterwarnings("ignore:ks_2samp")
@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=60),
       st.lists(st.floats(0, 1), min_size=1, max_size=60))
def test_the_ks_statistic_is_scipys(current, baseline):
    assert ks_statistic(current, baseline) == pytest.approx(
        ks_2samp(current, baseline).statistic, abs=1e-12)


def decisions(n, route_of, score=0.8, latency=5.0, start=0):
    return [DriftDecision(route_id=route_of(i), reason="semantic",
                         occurred_at=START + timedelta(seconds=start + i),
                         score=score if isinstance(score, float) else score(i),
                         decision_latency_ms=latency) for i in range(n)]


def test_overall_routing_flags_a_route_share_shift_and_low_confidence():
    thresholds = ROUTING["normal"]
    baseline = decisions(200, lambda i: "lite" if i % 2 else "deep",
                         score=lambda i: 0.5 + (i % 50) / 100)
    shifted = decisions(200, lambda i: "lite" if i % 10 else "deep",
                        score=lambda i: 0.5 + (i % 50) / 100)
    verdict = overall_verdict(shifted, baseline, thresholds)
    psi = signal(verdict, "route_share_psi")
    assert psi.flagged
    assert psi.severity == "severe"
    assert verdict.state == "severe"
    assert not signal(verdict, "score_ks").flagged, "same scores, no score shift"
    steady = overall_verdict(baseline, baseline, thresholds)
    assert steady.state == "none"
    low = [DriftDecision(route_id="lite", reason="low_confidence", occurred_at=d.occurred_at,
                        score=d.score) if i % 3 == 0 else d for i, d in enumerate(baseline)]
    assert signal(overall_verdict(low, baseline, thresholds), "low_confidence_rate").flagged
    assert overall_verdict(baseline[:10], baseline, thresholds).state == "insufficient_data"


def test_a_route_flags_a_score_shift_slower_decisions_and_escalations():
    thresholds = ROUTING["normal"]
    baseline = decisions(200, lambda i: "lite", score=lambda i: 0.6 + (i % 20) / 100)
    lower = decisions(200, lambda i: "lite", score=lambda i: 0.45 + (i % 20) / 100)
    scores = route_verdict(lower, baseline, [], [], thresholds)
    assert signal(scores, "score_ks").flagged
    assert scores.state == "mild"
    slow = decisions(200, lambda i: "lite", score=lambda i: 0.6 + (i % 20) / 100, latency=12.0)
    latency = route_verdict(slow, baseline, [], [], thresholds)
    assert signal(latency, "decision_latency_p95_ratio").value == 2.4
    escalated = [obs(i, escalation_path=("lite", "deep") if i % 2 else ("lite",))
                 for i in range(40)]
    both = route_verdict(slow, baseline, escalated, [], thresholds)
    assert signal(both, "escalation_rate").value == 0.5
    assert both.state == "severe", "two mild signals"


README = Path(__file__).resolve().parents[3] / "README.md"


def _readme_table(header: str) -> list[list[str]]:
    """The rows of README's tables whose header row starts with ``header``."""
    lines = README.read_text().splitlines()
    rows = []
    for start in (i for i, line in enumerate(lines) if line.startswith(f"| {header} |")):
        for line in lines[start + 2:]:
            if not line.startswith("|"):
                break
            rows.append([cell.replace("`", "").strip() for cell in line.strip("|").split("|")])
    return rows


def _every_signal_flagged(preset: str) -> dict[str, object]:
    """Each signal of each verdict, on windows far past every threshold of the preset."""
    thresholds = ROUTING[preset]
    n = thresholds.min_fill * 2
    baseline = decisions(n, lambda i: "lite", score=lambda i: 0.2 + (i % 10) / 100,
                         latency=1.0)
    window = [DriftDecision(route_id="deep", reason="low_confidence" if i % 2 else
                            "embedding_error", occurred_at=START + timedelta(seconds=i),
                            score=0.9 + (i % 10) / 100, decision_latency_ms=100.0)
              for i in range(n)]
    answers = [obs(i, completion_tokens=0, finish_reason="content_filter",
                   tools_requested=True, upstream_status=500 if i % 2 else 200,
                   ttft_ms=1000.0, escalation_path=("lite", "deep")) for i in range(40)]
    answers_before = [obs(i, ttft_ms=1.0) for i in range(40)]
    collapsing = [obs(i, completion_tokens=100 if i < 10 else 1) for i in range(20)]
    signals = {}
    for verdict in (overall_verdict(window, baseline, thresholds),
                    route_verdict(window, baseline, answers, answers_before, thresholds),
                    response_verdict(answers, RESPONSE[preset]),
                    response_verdict(collapsing, RESPONSE[preset])):
        signals.update({s.name: s for s in verdict.signals if s.flagged})
    return signals


@pytest.mark.parametrize("preset", ["low", "normal", "high"])
def test_every_signal_flags_with_the_severity_and_threshold_readme_gives(preset):
    flagged = _every_signal_flagged(preset)
    severities = {row[0]: row[-1] for row in _readme_table("signal")}
    assert set(flagged) == set(severities), "every signal README names, and no other"
    for name, severity in severities.items():
        # route_share_psi: "mild, severe past the severe band"; these windows are past it.
        assert flagged[name].severity == severity.split(",")[-1].split()[0], name
    response = next(r for r in _readme_table("preset | empty")
                    if r[0].split()[0] == preset)
    routing = next(r for r in _readme_table("preset | low confidence")
                   if r[0].split()[0] == preset)
    psi_mild = routing[3].split(" / ")[0]
    expected = dict(zip(
        ["empty_response_rate", "length_collapse", "tool_silence_rate", "stop_anomaly_rate",
         "error_rate", "low_confidence_rate", "embedding_error_rate", "route_share_psi",
         "score_ks", "decision_latency_p95_ratio", "ttft_p95_ratio", "escalation_rate"],
        [*response[1:6], *routing[1:3], psi_mild, routing[4], routing[5], routing[5],
         routing[6]], strict=True))
    assert {name: flagged[name].threshold for name in expected} == \
        {name: float(value) for name, value in expected.items()}
    assert (RESPONSE[preset].min_fill, ROUTING[preset].min_fill) == \
        (int(response[6]), int(routing[7]))
    assert ROUTING[preset].route_share_psi_severe == float(routing[3].split(" / ")[1])
