"""The drift detector's state: windows per target model, per route and over all routing,
their verdicts, and the transitions between verdicts. No Kafka, no files: the service
feeds it events and persists its snapshot; ``routemesh drift report`` feeds it audit
records.

A subject's state starts as ``insufficient_data`` and changes only by a transition,
which is what an alert reports: never once per event. A subject is judged every few of
its events (``model_stride``, ``stride``), counted in the snapshot, so the same events in
the same order give the same transitions. Transitions are numbered per subject, so the
same transition computed twice (after a crash and a redelivery) has the same identity.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Generic, Literal, TypeVar

import msgspec

from routemesh.contracts import DriftAlert
from routemesh.contracts.events import Severity, utc_now
from routemesh.services.drift_detector.presets import Preset, thresholds
from routemesh.services.drift_detector.signals import (
    EXPECTED_FINISH,
    DriftDecision,
    DriftObservation,
    ResponseWindow,
    State,
    Verdict,
    overall_verdict,
    route_verdict,
)

Scope = Literal["model", "route"]
SCOPES: tuple[Scope, ...] = ("model", "route")
# The subject of the routing verdict over all routes (no route id can be "*").
ALL_ROUTES = "*"
# Models and routes the config does not name share one window and one label.
OTHER = "other"
_TRANSITIONS = uuid.UUID("1d0e3f5a-3c4b-4b8e-9f1a-7c2d6e5b4a39")
# insufficient_data has no severity: 1.0 readers see it as none.
_SEVERITY: dict[State, Severity] = {"insufficient_data": "none", "none": "none",
                                    "mild": "mild", "severe": "severe"}

T = TypeVar("T", DriftDecision, DriftObservation)


class Sliding(msgspec.Struct, Generic[T], kw_only=True):
    """A current window and its baseline, the window before it: what leaves the current
    window enters the baseline. ``rebase`` makes the current window the baseline of what
    comes next (after a config change: the old config's traffic is what the new one's is
    compared with)."""

    current: list[T] = []
    baseline: list[T] = []

    def add(self, item: T, size: int) -> None:
        if len(self.current) >= size:
            self.baseline.append(self.current.pop(0))
            if len(self.baseline) > size:
                del self.baseline[0]
        self.current.append(item)

    def rebase(self) -> None:
        self.baseline, self.current = self.current, []


def subject_key(scope: Scope, subject: str) -> bytes:
    """A subject's key on the changelog, as ``DriftInput.subject_key`` spells it."""
    return f"{scope}:{subject}".encode()


def key_subject(key: bytes) -> tuple[Scope, str]:
    name, _, subject = key.decode().partition(":")
    for scope in SCOPES:
        if name == scope:
            return scope, subject
    raise ValueError(f"not a subject's key: {key!r}")


class Pinned(msgspec.Struct, frozen=True, kw_only=True):
    """A baseline `routemesh drift pin` wrote: routing compares with it instead of the
    preceding window, until it is removed."""

    pinned_at: datetime
    decisions: tuple[DriftDecision, ...] = ()
    observations: tuple[DriftObservation, ...] = ()


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    scope: Scope
    subject: str
    sequence: int
    previous: State
    verdict: Verdict
    window_start: datetime | None
    window_end: datetime | None
    baseline_samples: int
    config_sha256: str | None = None
    route_bank_sha256: str | None = None
    likely_cause: str | None = None

    @property
    def identity(self) -> uuid.UUID:
        """The same for the same transition however often it is computed."""
        return uuid.uuid5(_TRANSITIONS, f"{self.scope}|{self.subject}|{self.sequence}|"
                                       f"{self.previous}|{self.verdict.state}")

    def alert(self, preset: Preset, pinned_sha256: str | None = None) -> DriftAlert:
        """The DriftAlert reporting this transition; its 1.0 fields describe the leading
        signal (the first flagged one, severe before mild)."""
        signals = self.verdict.signals
        flagged = sorted((s for s in signals if s.flagged), key=lambda s: s.severity != "severe")
        lead = flagged[0] if flagged else None
        span = (self.window_end - self.window_start).total_seconds() \
            if self.window_start and self.window_end else 0.0
        return DriftAlert(
            event_id=self.identity,
            occurred_at=self.window_end or utc_now(),
            scope=self.scope,
            subject=self.subject,
            signal=lead.name if lead else "none",
            severity=_SEVERITY[self.verdict.state],
            previous_severity=_SEVERITY[self.previous],
            value=lead.value if lead and lead.value is not None else 0.0,
            window_seconds=max(span, 0.0),
            sample_size=self.verdict.samples,
            sensitivity=preset,
            verdict=self.verdict.state,
            previous_verdict=self.previous,
            signals=signals,
            reason=self.verdict.reason,
            window_start=self.window_start,
            window_end=self.window_end,
            baseline_samples=self.baseline_samples,
            baseline_kind=None if self.scope == "model"
            else "pinned" if pinned_sha256 else "preceding",
            baseline_sha256=pinned_sha256 if self.scope == "route" else None,
            config_sha256=self.config_sha256,
            route_bank_sha256=self.route_bank_sha256,
            likely_cause=self.likely_cause,
        )


class SubjectState(msgspec.Struct, kw_only=True):
    state: State = "insufficient_data"
    transitions: int = 0
    # Emptied on purpose (a model's recovery, a new routing baseline): the last verdict
    # stands until the window holds enough to judge again.
    refilling: bool = False
    # Events since the subject was last judged (routing subjects are judged every stride).
    pending: int = 0
    # A route's: the (config, route bank) of its last decision, and the config change its
    # transitions name as the likely cause during its next ``cause_left`` decisions. Per
    # subject, so that a subject's verdicts rest on its own events alone, wherever it is
    # judged (one detector, or the instance of a scaled-out one that owns it).
    config: tuple[str | None, str | None] | None = None
    cause: str | None = None
    cause_left: int = 0


class SubjectRecord(msgspec.Struct, kw_only=True):
    """One subject's share of a Snapshot: what a scaled-out detector saves per subject."""

    state: SubjectState
    model: list[DriftObservation] = []
    decisions: Sliding[DriftDecision] | None = None
    observations: Sliding[DriftObservation] | None = None


class Snapshot(msgspec.Struct, kw_only=True):
    """Everything the detector knows (``Detector.snapshot``), as the service writes it
    before committing."""

    models: dict[str, list[DriftObservation]] = {}
    decisions: dict[str, Sliding[DriftDecision]] = {}
    observations: dict[str, Sliding[DriftObservation]] = {}
    # Per scope ("model", "route"), each subject's state.
    subjects: dict[str, dict[str, SubjectState]] = {}
    # The (config, route bank) of the last decision seen, which a model's transition names.
    config: tuple[str | None, str | None] | None = None


class Detector:
    def __init__(
        self,
        preset: Preset = "normal",
        *,
        window: int = 20,
        routing_window: int = 500,
        max_age: timedelta | None = None,
        known_models: Iterable[str] | None = None,
        known_routes: Iterable[str] | None = None,
        expected_finish: frozenset[str] = EXPECTED_FINISH,
        max_subjects: int = 100,
        overrides: Mapping[str, float] | None = None,
    ) -> None:
        self.preset = preset
        self.response, self.routing = thresholds(preset, overrides)
        self.window = window
        self.routing_window = routing_window
        # How often a subject is judged, in its events: a model every fifth of its window
        # (a signal needs several of the window's observations to move; judged after every
        # observation, a noisy model's window touches a threshold by chance about three
        # times as often: bench/drift.py), and after every observation while its window
        # refills after a recovery, so a relapse is seen at the minimum fill; routing
        # every quarter window (its verdicts compare distributions of hundreds of events).
        # A change is seen at most a stride late.
        self.model_stride = max(1, window // 5)
        self.stride = max(1, routing_window // 4)
        self.max_age = max_age
        self.known_models = set(known_models) if known_models is not None else None
        self.known_routes = set(known_routes) if known_routes is not None else None
        self.expected_finish = expected_finish
        self.max_subjects = max_subjects
        self.pinned: Pinned | None = None
        self.pinned_sha256: str | None = None
        self.state = Snapshot()
        self._models: dict[str, ResponseWindow] = {}
        self._judged: set[tuple[Scope, str]] = set()
        self._fed: set[tuple[Scope, str]] = set()
        # Without a config, the names that have a label of their own.
        self._named: dict[Scope, set[str]] = {"model": set(), "route": set()}

    def known(self, models: Iterable[str] | None, routes: Iterable[str] | None) -> None:
        """The config's targets and routes; anything else is counted as ``other``."""
        self.known_models = set(models) if models is not None else None
        self.known_routes = set(routes) if routes is not None else None

    def pin(self, pinned: Pinned | None, sha256: str | None = None) -> None:
        """Compare routing with ``pinned`` from now on (None: with the preceding window)."""
        self.pinned, self.pinned_sha256 = pinned, sha256

    def label(self, name: str, scope: Scope) -> str:
        """The subject a name is judged and labelled under: itself if known (with no
        config, the first ``max_subjects`` names seen), else ``other``."""
        known = self.known_models if scope == "model" else self.known_routes
        if known is not None:
            return name if name in known else OTHER
        named = self._named[scope]
        if name in named or len(named) < self.max_subjects:
            named.add(name)
            return name
        return OTHER

    # -- feeding ----------------------------------------------------------------------

    def add_observation(self, view: DriftObservation,
                        attempts: Sequence[DriftObservation] = ()) -> list[Transition]:
        """Add an observation (the served answer) and the request's unserved ``attempts``
        (``unserved_attempts``), each to its own model's window; judge the models and the
        route when due. The route's window sees the request once."""
        return [transition for (scope, subject), answers in self.fan_out(view, attempts).items()
                for transition in self.feed(scope, subject, view, attempts, answers)]

    def add_decision(self, view: DriftDecision) -> list[Transition]:
        """Add a decision; judge its route and all routing when due."""
        return [transition for (scope, subject), answers in self.fan_out(view).items()
                for transition in self.feed(scope, subject, view, (), answers)]

    def fan_out(self, view: DriftObservation | DriftDecision,
                attempts: Sequence[DriftObservation] = ()
                ) -> dict[tuple[Scope, str], tuple[int, ...]]:
        """The subjects an event feeds, in order, each with the answers that are its own
        (for a model: indexes into ``(*attempts, view)``; a route takes the event)."""
        if isinstance(view, DriftDecision):
            return {("route", self.label(view.route_id, "route")): (),
                    ("route", ALL_ROUTES): ()}
        found: dict[tuple[Scope, str], tuple[int, ...]] = {}
        for index, answer in enumerate((*attempts, view)):
            key: tuple[Scope, str] = ("model", self.label(answer.target_model, "model"))
            found[key] = (*found.get(key, ()), index)
        found[("route", self.label(view.route_id, "route"))] = ()
        return found

    def feed(self, scope: Scope, subject: str, view: DriftObservation | DriftDecision,
             attempts: Sequence[DriftObservation] = (), answers: tuple[int, ...] = ()
             ) -> list[Transition]:
        """One subject's share of an event (``fan_out``); its transitions."""
        self._fed.add((scope, subject))
        if isinstance(view, DriftDecision):
            return self._add_decision(subject, view)
        if scope == "route":
            self.state.observations.setdefault(subject, Sliding()).add(view, self.routing_window)
            return self._due("route", subject, self.stride)
        transitions: list[Transition] = []
        for answer in ((*attempts, view)[index] for index in answers):
            window = self._models.get(subject)
            if window is None:
                window = self._models[subject] = ResponseWindow(
                    self.window, self.expected_finish, self.max_age)
            window.add(answer)
            transitions += self._due("model", subject, self.model_stride)
        return transitions

    def _add_decision(self, subject: str, view: DriftDecision) -> list[Transition]:
        known = self.subject("route", subject)
        config = (view.config_sha256, view.route_bank_sha256)
        if known.config is not None and config != known.config:
            self._new_baseline(subject, known, config)
        elif known.cause_left:
            known.cause_left -= 1
        known.config = self.state.config = config
        self.state.decisions.setdefault(subject, Sliding()).add(view, self.routing_window)
        return self._due("route", subject, self.stride)

    def _new_baseline(self, subject: str, known: SubjectState,
                      config: tuple[str | None, str | None]) -> None:
        previous = known.config or (None, None)
        what = "config" if config[0] != previous[0] else "route bank"
        old, new = (previous[0], config[0]) if what == "config" else (previous[1], config[1])
        known.cause = f"{what} changed from {str(old)[:12]} to {str(new)[:12]}"
        known.cause_left = 2 * self.routing_window
        for windows in (self.state.decisions, self.state.observations):
            if subject in windows:
                windows[subject].rebase()
        known.refilling = True

    # -- judging ----------------------------------------------------------------------

    def subject(self, scope: Scope, subject: str) -> SubjectState:
        subjects = self.state.subjects.setdefault(scope, {})
        known = subjects.get(subject)
        if known is None:
            known = subjects[subject] = SubjectState()
        return known

    def _due(self, scope: Scope, subject: str, stride: int) -> list[Transition]:
        known = self.subject(scope, subject)
        known.pending += 1
        if known.pending < stride and not (scope == "model" and known.refilling):
            return []
        return self._judge(scope, subject)

    def verdict(self, scope: Scope, subject: str
                ) -> tuple[Verdict, Sequence[DriftObservation | DriftDecision], int]:
        """The subject's verdict now, the events it judged and the baseline's size."""
        if scope == "model":
            window = self._models[subject]
            return window.verdict(self.response), window.items, 0
        decisions = self.state.decisions.get(subject, Sliding())
        observations = self.state.observations.get(subject, Sliding())
        if self.pinned is not None:
            baseline = [d for d in self.pinned.decisions
                        if subject == ALL_ROUTES or d.route_id == subject]
            observations_before = [o for o in self.pinned.observations
                                   if o.route_id == subject]
        else:
            baseline, observations_before = decisions.baseline, observations.baseline
        if subject == ALL_ROUTES:
            verdict = overall_verdict(decisions.current, baseline, self.routing)
        else:
            verdict = route_verdict(decisions.current, baseline, observations.current,
                                    observations_before, self.routing)
        return verdict, decisions.current, len(baseline)

    def _judge(self, scope: Scope, subject: str) -> list[Transition]:
        known = self.subject(scope, subject)
        known.pending = 0
        self._judged.add((scope, subject))
        if scope == "model":
            # Most judgements change nothing: the state alone, the whole verdict only then.
            new = self._models[subject].state(self.response)
        else:
            verdict, judged, baseline = self.verdict(scope, subject)
            new = verdict.state
        if known.refilling and new == "insufficient_data":
            # Emptied on purpose: the last verdict stands until the window holds the
            # minimum fill again; a relapse is then reported at once.
            return []
        known.refilling = False
        if new == known.state:
            return []
        if scope == "model":
            verdict, judged, baseline = self.verdict(scope, subject)
        config = (known.config if scope == "route" else self.state.config) or (None, None)
        transition = Transition(
            scope=scope, subject=subject, sequence=known.transitions + 1,
            previous=known.state, verdict=verdict,
            window_start=judged[0].occurred_at if judged else None,
            window_end=judged[-1].occurred_at if judged else None,
            baseline_samples=baseline,
            config_sha256=config[0], route_bank_sha256=config[1],
            likely_cause=known.cause if scope == "route" and known.cause_left else None,
        )
        recovered = new == "none" and known.state in ("mild", "severe")
        known.state, known.transitions = new, known.transitions + 1
        if scope == "model" and recovered:
            # An old incident must neither keep the model flagged nor weigh on the next.
            self._models[subject].clear()
            known.refilling = True
        return [transition]

    def judged(self) -> dict[tuple[Scope, str], Verdict]:
        """The verdict now of every subject judged since the last call."""
        judged, self._judged = self._judged, set()
        return {key: self.verdict(*key)[0] for key in sorted(judged)}

    # -- persistence ------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        self.state.models = {name: list(window.items) for name, window in self._models.items()}
        return self.state

    def restore(self, snapshot: Snapshot) -> None:
        """Continue from a snapshot (windows cut to this detector's sizes)."""
        self._models = {}
        for name, answers in snapshot.models.items():
            self._put_model(name, answers)
        for decisions in snapshot.decisions.values():
            self._cut(decisions)
        for observations in snapshot.observations.values():
            self._cut(observations)
        self.state = snapshot
        self._named = {"model": set(self._models) - {OTHER},
                       "route": set(snapshot.decisions) - {OTHER, ALL_ROUTES}}

    def take_fed(self) -> set[tuple[Scope, str]]:
        """The subjects fed since the last call: what a save per subject writes."""
        fed, self._fed = self._fed, set()
        return fed

    def refeed(self, subjects: set[tuple[Scope, str]]) -> None:
        """Subjects ``take_fed`` gave that a save did not write after all."""
        self._fed |= subjects

    def record(self, scope: Scope, subject: str) -> SubjectRecord:
        """A subject's state and windows."""
        if scope == "model":
            window = self._models.get(subject)
            return SubjectRecord(state=self.subject(scope, subject),
                                 model=list(window.items) if window else [])
        return SubjectRecord(state=self.subject(scope, subject),
                             decisions=self.state.decisions.get(subject),
                             observations=self.state.observations.get(subject))

    def put(self, scope: Scope, subject: str, record: SubjectRecord) -> None:
        """Continue a subject from its record (windows cut to this detector's sizes)."""
        self.state.subjects.setdefault(scope, {})[subject] = record.state
        if scope == "model":
            self._put_model(subject, record.model)
            return
        if record.decisions is not None:
            self._cut(record.decisions)
            self.state.decisions[subject] = record.decisions
        if record.observations is not None:
            self._cut(record.observations)
            self.state.observations[subject] = record.observations
        if subject not in (OTHER, ALL_ROUTES):
            self._named["route"].add(subject)

    def drop(self, scope: Scope, subject: str) -> None:
        """Forget a subject (its partition went to another instance)."""
        self.state.subjects.get(scope, {}).pop(subject, None)
        if scope == "model":
            self._models.pop(subject, None)
        else:
            self.state.decisions.pop(subject, None)
            self.state.observations.pop(subject, None)
        self._judged.discard((scope, subject))
        self._fed.discard((scope, subject))

    def _put_model(self, name: str, observations: Iterable[DriftObservation]) -> None:
        window = self._models[name] = ResponseWindow(self.window, self.expected_finish,
                                                     self.max_age)
        for view in observations:
            window.add(view)
        if name != OTHER:
            self._named["model"].add(name)

    def _cut(self, sliding: Sliding[T]) -> None:
        del sliding.current[:-self.routing_window]
        del sliding.baseline[:-self.routing_window]
