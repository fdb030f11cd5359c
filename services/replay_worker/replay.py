"""One replay: cases through the current config, a candidate and a previous config,
``always-<route>`` for every route and rules-only, side by side; figures, deltas, and
the per-case evidence (hashes and lengths, never text). The CLI and the worker share it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import msgspec

from routemesh.contracts import RouteDecided
from routemesh.contracts.events import utc_now
from routemesh.services.replay_worker.cases import Case, input_set_sha256
from routemesh.services.router import (
    CachingEncoder,
    EncoderConfig,
    LoadedConfig,
    Router,
    build_dense_encoder,
    decision_sha256,
    load_config,
    load_router,
    score,
)
from routemesh.services.router.datasets import EvalItem
from routemesh.services.router.evaluate import RouteFigures
from routemesh.services.runtime.files import files_sha256
from routemesh.services.runtime.stats import shares

CONFIG_SYSTEMS = ("current", "candidate", "previous")
# Texts encoded (and decided) at a time.
BATCH = 64
Source = Literal["dataset", "captures", "audit"]


class ReplayError(ValueError):
    """A replay that cannot run as asked: the message says why."""


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    route_id: str
    reason: str
    target_model: str
    match_source: str | None = None
    sha256: str


class CaseRow(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    text_sha256: str
    chars: int
    label: str | None = None
    recorded_route: str | None = None
    # By config system (current, candidate, previous); empty when the text is unknown.
    decisions: dict[str, Decision] = {}


Kind = Literal["config", "always", "rules", "recorded"]
Verdict = Literal["fixed", "broken", "changed"]


class SystemFigures(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: Kind
    cases: int
    config_sha256: str | None = None
    route_mix: dict[str, float] = {}
    estimated_cost: float = 0.0
    # Labelled cases only.
    accuracy: float | None = None
    macro_f1: float | None = None
    per_route: dict[str, RouteFigures] = {}
    # Cases with a recorded decision: the share this system decided the same.
    agreement: float | None = None


class Flip(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    text_sha256: str
    before: str
    after: str
    label: str | None = None
    # Against the label: fixed (now right), broken (now wrong), changed (wrong both, or
    # no label).
    verdict: Verdict = "changed"


class Delta(msgspec.Struct, frozen=True, kw_only=True):
    before: str
    after: str
    cases: int
    route_changed: int
    reason_changed: int
    target_changed: int
    match_source_changed: int
    flips: list[Flip] = []


class ConfigInput(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    # Of the validated config (formatting left out), and of every file it was read from.
    config_sha256: str
    files_sha256: str
    route_bank_sha256: str | None = None


class Inputs(msgspec.Struct, frozen=True, kw_only=True):
    source: Source
    name: str
    # Of the files or directory read (as stored), and of the cases (order-independent).
    files_sha256: str
    input_set_sha256: str
    cases_read: int
    limit: int
    configs: dict[str, ConfigInput] = {}
    # Lines of the input (or audit) files that were not read: file name -> reason -> count.
    skipped_lines: dict[str, dict[str, int]] = {}


class ReplayResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a replay found, before its receipt and drift section are added."""

    created_at: datetime
    inputs: Inputs
    labelled: bool
    systems: list[SystemFigures]
    deltas: list[Delta]
    cases: list[CaseRow]
    errors: dict[str, int] = {}


@dataclass(frozen=True)
class Configs:
    current: LoadedConfig
    candidate: LoadedConfig | None = None
    previous: LoadedConfig | None = None

    def named(self) -> list[tuple[str, LoadedConfig]]:
        return [(name, loaded) for name, loaded in zip(
            CONFIG_SYSTEMS, (self.current, self.candidate, self.previous), strict=True)
            if loaded is not None]


# Addresses on this machine's own networks. Python's ``is_private`` also counts the
# documentation and reserved ranges, which are not.
_PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12",
                                              "192.168.0.0/16", "fc00::/7")]


def _local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_loopback or ip.is_link_local or any(
        ip.version == net.version and ip in net for net in _PRIVATE)


def check_embedding_endpoint(loaded: LoadedConfig, allow_remote: bool) -> None:
    """A replay sends every case's text to the config's encoder: an ``openai`` encoder
    must be on this machine or a private network unless the caller allows otherwise."""
    encoder = loaded.config.encoder
    if encoder.kind != "openai" or allow_remote:
        return
    host = urlsplit(encoder.base_url or "").hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        addresses = set()
    local = bool(addresses) and all(_local(ipaddress.ip_address(str(a).split("%")[0]))
                                    for a in addresses)
    if not local:
        where = host or "an unknown host"
        raise ReplayError(
            f"{loaded.source}: its encoder sends the replayed texts to {where}, which is "
            "not on this machine or a private network; pass --allow-remote-embeddings to "
            "send them there anyway")


def open_routers(configs: Configs, allow_remote: bool = False,
                 batch: int = BATCH) -> dict[str, Router]:
    """A router per config, banks built in memory (a replay depends on the configs, not
    on a Qdrant's state); configs with the same encoder share one, and a cache of one
    batch, so that a batch is encoded once for all of them."""
    routers: dict[str, Router] = {}
    encoders: list[tuple[EncoderConfig, CachingEncoder]] = []
    for name, loaded in configs.named():
        check_embedding_endpoint(loaded, allow_remote)
        encoder = next((e for spec, e in encoders if spec == loaded.config.encoder), None)
        if encoder is None:
            encoder = CachingEncoder(build_dense_encoder(loaded.config.encoder), batch)
            encoders.append((loaded.config.encoder, encoder))
        routers[name] = load_router(loaded, encoder=encoder)
    return routers


def _decision(d: RouteDecided) -> Decision:
    return Decision(route_id=d.route_id, reason=d.reason, target_model=d.target_model,
                    match_source=d.match_source, sha256=decision_sha256(d))


def _baselines(router: Router, cases: list[Case]) -> dict[str, list[RouteDecided]]:
    out: dict[str, list[RouteDecided]] = {}
    for route in router.config.routes:
        out[f"always-{route.id}"] = [
            RouteDecided(request_id=c.id, route_id=route.id, target_model=route.target_model,
                         reason="default", layer="fallback") for c in cases]
    out["rules-only"] = [router.decide_rules_only(c.request, c.id) for c in cases
                         if c.request is not None]
    return out


def _cost(router: Router, cases: list[Case], routes: list[str]) -> float:
    total = 0.0
    for case, route_id in zip(cases, routes, strict=True):
        route = router.route(route_id)
        if route is not None:
            total += case.cost(route)
    return round(total, 9)


def _figures(name: str, kind: Kind, cases: list[Case], decisions: list[RouteDecided],
             priced_by: Router, config_sha256: str | None = None) -> SystemFigures:
    routes = [d.route_id for d in decisions]
    labelled = all(c.label is not None for c in cases) and bool(cases)
    scored = score([EvalItem(c.id, c.request, c.label) for c in cases],  # type: ignore[arg-type]
                   decisions, [r.id for r in priced_by.config.routes]) if labelled else None
    recorded = [(c.recorded.route_id, r) for c, r in zip(cases, routes, strict=True)
                if c.recorded is not None]
    return SystemFigures(
        name=name, kind=kind, cases=len(cases), config_sha256=config_sha256,
        route_mix=shares(routes),
        estimated_cost=_cost(priced_by, cases, routes),
        accuracy=scored.accuracy if scored else None,
        macro_f1=scored.macro_f1 if scored else None,
        per_route=scored.per_route if scored else {},
        agreement=sum(a == b for a, b in recorded) / len(recorded) if recorded else None,
    )


def _delta(before: str, after: str, rows: list[CaseRow]) -> Delta:
    pairs = [(r, r.decisions[before], r.decisions[after]) for r in rows
             if before in r.decisions and after in r.decisions]
    flips = []
    for row, b, a in pairs:
        if b.route_id == a.route_id:
            continue
        verdict: Verdict = "changed"
        if row.label is not None and row.label in (a.route_id, b.route_id):
            verdict = "fixed" if a.route_id == row.label else "broken"
        flips.append(Flip(id=row.id, text_sha256=row.text_sha256, before=b.route_id,
                          after=a.route_id, label=row.label, verdict=verdict))
    return Delta(
        before=before, after=after, cases=len(pairs), route_changed=len(flips),
        reason_changed=sum(b.reason != a.reason for _, b, a in pairs),
        target_changed=sum(b.target_model != a.target_model for _, b, a in pairs),
        match_source_changed=sum(b.match_source != a.match_source for _, b, a in pairs),
        flips=flips,
    )


def replay(
    configs: Configs,
    cases: list[Case],
    *,
    source: Source,
    input_name: str,
    input_files_sha256: str,
    cases_read: int,
    limit: int,
    skipped_lines: dict[str, dict[str, int]] | None = None,
    routers: dict[str, Router] | None = None,
    progress: Callable[[int], None] = lambda done: None,
    batch: int = BATCH,
) -> ReplayResult:
    """``cases`` (sampled already, in id order) through every system."""
    routers = routers or open_routers(configs)
    current = routers["current"]
    known = [c for c in cases if c.request is not None]
    decided: dict[str, list[RouteDecided]] = {name: [] for name in routers}
    # Batch by batch through every config: configs that share an encoder find the batch's
    # vectors in its cache.
    for start in range(0, len(known), batch):
        chunk = [(c.request, c.id) for c in known[start : start + batch]]
        for name, router in routers.items():
            decided[name] += router.decide_many(chunk, batch=batch)  # type: ignore[arg-type]
            progress(len(chunk))
    by_name = dict(configs.named())
    systems = [
        _figures(name, "config", known, decided[name], routers[name], by_name[name].sha256)
        for name in routers
    ]
    systems += [_figures(name, "always" if name.startswith("always-") else "rules", known,
                         decisions, current)
                for name, decisions in _baselines(current, known).items()]
    recorded = [c for c in cases if c.recorded is not None]
    if recorded:
        systems.append(_figures("recorded", "recorded", recorded,
                                [RouteDecided(request_id=c.id, route_id=c.recorded.route_id,  # type: ignore[union-attr]
                                              target_model="", reason="default",
                                              layer="fallback") for c in recorded], current))
    rows = []
    index = {name: {d.request_id: d for d in decisions} for name, decisions in decided.items()}
    for case in cases:
        rows.append(CaseRow(
            id=case.id, text_sha256=case.text_sha256, chars=case.chars, label=case.label,
            recorded_route=case.recorded.route_id if case.recorded else None,
            decisions={name: _decision(index[name][case.id]) for name in decided
                       if case.id in index[name]},
        ))
    deltas = []
    if "candidate" in routers:
        deltas.append(_delta("current", "candidate", rows))
    if "previous" in routers:
        deltas.append(_delta("previous", "current", rows))
    errors: Counter[str] = Counter(d.reason for decisions in decided.values()
                                   for d in decisions if d.reason == "embedding_error")
    if len(known) < len(cases):
        errors["no_text"] = len(cases) - len(known)
    return ReplayResult(
        created_at=utc_now(),
        inputs=Inputs(
            source=source, name=input_name, files_sha256=input_files_sha256,
            input_set_sha256=input_set_sha256(cases), cases_read=cases_read, limit=limit,
            skipped_lines=skipped_lines or {},
            configs={name: ConfigInput(name=loaded.source, config_sha256=loaded.sha256,
                                       files_sha256=files_sha256(loaded.files),
                                       route_bank_sha256=routers[name].route_bank_sha256)
                     for name, loaded in configs.named()},
        ),
        labelled=bool(known) and all(c.label is not None for c in known),
        systems=systems,
        deltas=deltas,
        cases=rows,
        errors=dict(sorted(errors.items())),
    )


def load_configs(current: Path, candidate: Path | None = None,
                 previous: Path | None = None) -> Configs:
    return Configs(load_config(current),
                   load_config(candidate) if candidate is not None else None,
                   load_config(previous) if previous is not None else None)
