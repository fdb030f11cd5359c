"""Live against shadow decisions over a window: how often the shadow config agreed, how
the route mix would move, and (where outcomes say what was right) the accuracy change."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

import msgspec

from routemesh.contracts import OutcomeReported, RouteDecided, ShadowDecided
from routemesh.contracts.topics import ROUTE_DECISIONS, ROUTE_OUTCOMES, ROUTE_SHADOW_DECISIONS
from routemesh.services.runtime.consumer import events_since
from routemesh.services.runtime.settings import ServiceSettings
from routemesh.services.runtime.stats import shares

DISAGREEMENTS_LISTED = 100


class Disagreement(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    live: str
    shadow: str


class ShadowReport(msgspec.Struct, frozen=True, kw_only=True):
    window_start: datetime | None
    window_end: datetime | None
    live: int
    shadow: int
    # Requests with both a live and a shadow decision.
    pairs: int
    agreement: float | None
    live_configs: dict[str, int] = {}
    shadow_configs: dict[str, int] = {}
    route_mix_live: dict[str, float] = {}
    route_mix_shadow: dict[str, float] = {}
    # Of the pairs with an outcome that says whether the live route was right (or which
    # route was): how many the shadow can be judged on, and both accuracies on those.
    judged: int = 0
    live_accuracy: float | None = None
    shadow_accuracy: float | None = None
    accuracy_delta: float | None = None
    disagreements: list[Disagreement] = []


class Window(msgspec.Struct, frozen=True):
    """Live decisions, shadow decisions and outcomes of one period."""

    decisions: list[RouteDecided]
    shadows: list[ShadowDecided]
    outcomes: list[OutcomeReported]


def _right(route: str, live: str, outcome: OutcomeReported) -> bool | None:
    """Whether ``route`` was right for the request, as far as its outcome tells: the
    expected route when given; else ``correct_route`` judges the live route only, which
    tells about another route only when the live one was right."""
    if outcome.expected_route is not None:
        return route == outcome.expected_route
    if outcome.correct_route is None:
        return None
    if route == live:
        return outcome.correct_route
    return False if outcome.correct_route else None


def compare(window: Window) -> ShadowReport:
    live = {d.request_id: d for d in window.decisions}
    shadow = {d.request_id: d for d in window.shadows}
    times = [d.occurred_at for d in (*live.values(), *shadow.values())]
    pairs = sorted(live.keys() & shadow.keys())
    agree = [live[r].route_id == shadow[r].route_id for r in pairs]
    by_request = {o.request_id: o for o in window.outcomes}
    judged = []
    for r in pairs:
        outcome = by_request.get(r)
        if outcome is None:
            continue
        live_route = live[r].route_id
        a, b = _right(live_route, live_route, outcome), \
            _right(shadow[r].route_id, live_route, outcome)
        if a is not None and b is not None:
            judged.append((a, b))

    live_acc = sum(a for a, _ in judged) / len(judged) if judged else None
    shadow_acc = sum(b for _, b in judged) / len(judged) if judged else None
    return ShadowReport(
        window_start=min(times, default=None), window_end=max(times, default=None),
        live=len(live), shadow=len(shadow), pairs=len(pairs),
        agreement=sum(agree) / len(pairs) if pairs else None,
        live_configs=dict(Counter(d.config_sha256 or "" for d in live.values())),
        shadow_configs=dict(Counter(d.config_sha256 or "" for d in shadow.values())),
        route_mix_live=shares(live[r].route_id for r in pairs),
        route_mix_shadow=shares(shadow[r].route_id for r in pairs),
        judged=len(judged), live_accuracy=live_acc, shadow_accuracy=shadow_acc,
        accuracy_delta=shadow_acc - live_acc if judged else None,  # type: ignore[operator]
        disagreements=[Disagreement(request_id=r, live=live[r].route_id,
                                    shadow=shadow[r].route_id)
                       for r, same in zip(pairs, agree, strict=True)
                       if not same][:DISAGREEMENTS_LISTED],
    )


async def read_window(settings: ServiceSettings, since: datetime) -> Window:
    """The window from ``since`` up to the topics' ends when called."""
    events = await events_since(
        settings, [ROUTE_DECISIONS, ROUTE_SHADOW_DECISIONS, ROUTE_OUTCOMES], since)
    return Window([e for e in events if isinstance(e, RouteDecided)],
                  [e for e in events if isinstance(e, ShadowDecided)],
                  [e for e in events if isinstance(e, OutcomeReported)])


def render_markdown(report: ShadowReport) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = ["# routemesh shadow report", "",
             f"{report.live} live and {report.shadow} shadow decisions from "
             f"{report.window_start} to {report.window_end}; {report.pairs} requests have "
             "both.", "", f"**Agreement: {f(report.agreement)}**", "",
             "| route | live share | shadow share |", "| --- | --- | --- |"]
    routes = sorted(set(report.route_mix_live) | set(report.route_mix_shadow))
    lines += [f"| {r} | {f(report.route_mix_live.get(r, 0.0))} | "
              f"{f(report.route_mix_shadow.get(r, 0.0))} |" for r in routes]
    lines += ["", f"Outcomes judge {report.judged} pairs: live accuracy "
              f"{f(report.live_accuracy)}, shadow {f(report.shadow_accuracy)}, delta "
              f"{f(report.accuracy_delta)}.", ""]
    return "\n".join(lines)
