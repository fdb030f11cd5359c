"""The scorer's state on disk (runtime ``SavedState``): the ledger and the offsets it
covers, written whole and atomically before those offsets are committed.
`routemesh tune --from-scores` and `routemesh review candidates --state-dir` read it back."""

from __future__ import annotations

from pathlib import Path

from routemesh.services.runtime.state import Covered, read_state
from routemesh.services.scorer.ledger import Snapshot


class State(Covered, kw_only=True):
    ledger: Snapshot


def read_scorer_state(state_dir: Path) -> State | None:
    return read_state(state_dir, State)
