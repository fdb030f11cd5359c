"""The scorer's state on disk: the ledger and the offsets it covers, written whole and
atomically before those offsets are committed. `routemesh tune --from-scores` and
`routemesh review candidates --state-dir` read it back."""

from __future__ import annotations

from pathlib import Path

import msgspec

from routemesh.services.runtime.files import read_if_present, write_atomically
from routemesh.services.scorer.ledger import Snapshot

STATE_FILE = "state.msgpack"


class State(msgspec.Struct, kw_only=True):
    ledger: Snapshot
    offsets: dict[str, int] = {}
    # The event id before each offset (runtime Checkpoints.anchors).
    anchors: dict[str, str] = {}


def read_state(state_dir: Path) -> State | None:
    data = read_if_present(state_dir / STATE_FILE)
    return None if data is None else msgspec.msgpack.decode(data, type=State)


def write_state(state_dir: Path, data: bytes) -> None:
    write_atomically(state_dir / STATE_FILE, data)
