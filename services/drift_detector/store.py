"""The drift detector's files in its state directory: the state it saves before offsets
are committed (written by runtime ``SavedState``), and the pinned baseline `routemesh
drift pin` writes."""

from __future__ import annotations

from pathlib import Path

import msgspec

from routemesh.contracts import DriftAlert
from routemesh.contracts.events import utc_now
from routemesh.services.drift_detector.detector import ALL_ROUTES, Pinned, Snapshot
from routemesh.services.runtime.files import write_atomically
from routemesh.services.runtime.state import Covered, read_state

PIN_FILE = "pinned-baseline.json"


class State(Covered, kw_only=True):
    """What the service writes before committing offsets (runtime ``SavedState``)."""

    detector: Snapshot
    # Alerts computed and not yet confirmed by the broker.
    outbox: list[DriftAlert] = []


class Mark(Covered, kw_only=True):
    """A scaled-out detector's mark on a changelog partition (runtime ``Changelog``),
    after the subjects it saved: the offsets they cover, the alerts waiting, and the
    (config, route bank) a model's transition names."""

    outbox: list[DriftAlert] = []
    config: tuple[str | None, str | None] | None = None


def read_drift_state(state_dir: Path) -> State | None:
    return read_state(state_dir, State)


def pin(state_dir: Path) -> Pinned:
    """Pin the routing windows the running detector last saved as the baseline it
    compares with from now on (it notices the file within a second)."""
    state = read_drift_state(state_dir)
    if state is None:
        raise FileNotFoundError(
            f"no drift state in {state_dir}: is the detector running there? (detectors with "
            "ROUTEMESH_DRIFT_STATE_STORE=changelog keep their windows on the changelog "
            "topic, which drift pin does not read)")
    windows = state.detector
    everything = windows.decisions.get(ALL_ROUTES)
    pinned = Pinned(
        pinned_at=utc_now(),
        decisions=tuple(everything.current) if everything else (),
        observations=tuple(o for route, sliding in sorted(windows.observations.items())
                           for o in sliding.current),
    )
    write_atomically(state_dir / PIN_FILE, msgspec.json.encode(pinned))
    return pinned


def unpin(state_dir: Path) -> bool:
    """Back to comparing with the preceding window; False if nothing was pinned."""
    try:
        (state_dir / PIN_FILE).unlink()
    except FileNotFoundError:
        return False
    return True
