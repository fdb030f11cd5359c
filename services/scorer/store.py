"""The scorer's state on disk (runtime ``SavedState``): the ledger and the offsets it
covers, written whole and atomically before those offsets are committed; or, with the
changelog store, on the changelog topic. `routemesh tune --from-scores` reads either."""

from __future__ import annotations

from pathlib import Path

from routemesh.contracts.topics import SCORER_CHANGELOG
from routemesh.services.runtime.changelog import Changelog
from routemesh.services.runtime.settings import ServiceSettings
from routemesh.services.runtime.state import Covered, read_state
from routemesh.services.scorer import changelog
from routemesh.services.scorer.ledger import Ledger, Limits, Snapshot


class State(Covered, kw_only=True):
    ledger: Snapshot


def read_scorer_state(state_dir: Path) -> State | None:
    return read_state(state_dir, State)


async def read_scorer_changelog(settings: ServiceSettings) -> Ledger:
    """Every partition's ledger on the changelog, summed (what the publisher publishes)."""
    log = Changelog(settings, SCORER_CHANGELOG, "cli")
    restored = await log.read(range(log.partitions))
    parts = [changelog.restore(found, Limits())[0] for found in restored.values()]
    return Ledger.merged(parts, Limits())
