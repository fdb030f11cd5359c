"""The skeleton of a consumer whose effect is a state it saves whole (the scorer's ledger,
the drift detector's windows): restored at start with the offsets it covers, fed only
the deliveries it lacks, saved at most every interval (backing off while saving fails),
and the consumer's holds released once it is on disk, so a commit never passes what is
not saved. Each service keeps its own state struct (a ``Covered`` with its fields) and
decides what else a save includes; what is written and when is here, once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import TypeVar

import msgspec
from prometheus_client import Histogram

from routemesh.services.runtime.consumer import (
    Checkpoints,
    Delivery,
    OffsetTracker,
    PartitionKey,
)
from routemesh.services.runtime.files import read_if_present, write_atomically
from routemesh.services.runtime.retry import Backoff
from routemesh.services.runtime.telemetry import Readiness

log = logging.getLogger(__name__)
STATE_FILE = "state.msgpack"


class Covered(msgspec.Struct, kw_only=True):
    """What every saved state carries: the offsets it covers ("topic:partition" -> the
    next offset) and the event id just before each (``Checkpoints.anchors``)."""

    offsets: dict[str, int] = {}
    anchors: dict[str, str] = {}


S = TypeVar("S", bound=Covered)


def read_state(directory: Path, kind: type[S]) -> S | None:
    data = read_if_present(directory / STATE_FILE)
    return None if data is None else msgspec.msgpack.decode(data, type=kind)


def write_state(directory: Path, data: bytes) -> None:
    write_atomically(directory / STATE_FILE, data)


class SavedState:
    """One service's state on disk and the checkpoints that go with it."""

    def __init__(self, directory: Path, readiness: Readiness, check: str,
                 save_seconds: Histogram, interval_s: float) -> None:
        self.directory = directory
        self.readiness, self.check = readiness, check
        self.save_seconds = save_seconds
        self.interval_s = interval_s
        self.checkpoints = Checkpoints()
        self._backoff = Backoff(0.5, 30.0)
        self._delays = self._backoff.delays()
        self._retry_at = 0.0
        self._last_save = 0.0

    async def restore(self, kind: type[S]) -> S | None:
        """The saved state, its offsets taken over by the checkpoints; None at first."""
        self.directory.mkdir(parents=True, exist_ok=True)
        state = await asyncio.to_thread(read_state, self.directory, kind)
        if state is not None:
            self.checkpoints.restore(state.offsets, state.anchors)
        self.readiness.set(self.check, True, "writable")
        return state

    def kept_elsewhere(self) -> None:
        """The state is not in the directory (a changelog topic holds it): nothing to
        restore at start; each partition's offsets come with its state."""
        self.readiness.set(self.check, True, "kept on the changelog")

    def fresh(self, deliveries: Sequence[Delivery], offsets: OffsetTracker) -> list[Delivery]:
        return self.checkpoints.fresh(deliveries, offsets)

    def revoked(self, partitions: Collection[PartitionKey]) -> None:
        self.checkpoints.revoked(partitions)

    @property
    def unsaved(self) -> bool:
        return self.checkpoints.unsaved

    def due(self, now: float) -> bool:
        """Whether the interval since the last save has passed."""
        return now - self._last_save >= self.interval_s

    def may_try(self, now: float) -> bool:
        """False while backing off after a failure."""
        return now >= self._retry_at

    async def save(self, encode: Callable[[dict[str, int], dict[str, str]], bytes]) -> None:
        """Write the state ``encode`` makes of the current offsets and anchors; raises
        when the disk fails (``failed`` then backs off)."""
        await self.save_with(lambda offsets, anchors: asyncio.to_thread(
            write_state, self.directory, encode(offsets, anchors)))

    async def save_with(self, write: Callable[[dict[str, int], dict[str, str]],
                                              Awaitable[None]]) -> None:
        """Save the state with ``write`` (somewhere else than the directory: a
        changelog topic) given the current offsets and anchors; raises as it does."""
        offsets = dict(self.checkpoints.offsets)
        started = time.perf_counter()
        await write(offsets, dict(self.checkpoints.anchors))
        self.save_seconds.observe(time.perf_counter() - started)
        self.checkpoints.saved(offsets)
        self._last_save = time.monotonic()

    def succeeded(self, offsets: OffsetTracker | None) -> None:
        """What was held for the save is released (None: the consumer has stopped);
        the backoff starts over."""
        self._delays = self._backoff.delays()
        self.readiness.set(self.check, True, "saved")
        if offsets is not None:
            self.checkpoints.release(offsets)

    def failed(self, exc: Exception, what: str) -> None:
        """What is held stays held and the next poll after a backoff tries again."""
        self._retry_at = time.monotonic() + next(self._delays)
        self.readiness.set(self.check, False, str(exc))
        log.error("%s; retrying", what, extra={"error": str(exc)})
