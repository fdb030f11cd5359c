"""An append-only spool of encoded events on local disk, read back in order.

``events.jsonl`` holds one encoded event per line; ``offset`` holds how many bytes of it
the broker has confirmed. Both survive a restart; when everything is confirmed the spool
is emptied. Written here because what is needed is small and exact: order, a confirmed
read position, and a rewrite that puts older events first at shutdown.
"""

from __future__ import annotations

import os
from pathlib import Path

from routemesh.services.runtime.files import write_atomically


class Spool:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "events.jsonl"
        self.offset_path = directory / "offset"
        self.path.touch()
        self.offset = int(self.offset_path.read_text() or 0) if self.offset_path.exists() else 0
        self._handle = self.path.open("ab")
        if self._torn():
            # A crash mid-write left a line without its end: end it, so the fragment is a
            # line of its own (dead-lettered as it is when read) and the next event starts
            # on a fresh line instead of being glued to it.
            self._handle.write(b"\n")
            self._handle.flush()

    def _torn(self) -> bool:
        if self.size == 0:
            return False
        with self.path.open("rb") as reader:
            reader.seek(-1, os.SEEK_END)
            return reader.read(1) != b"\n"

    @property
    def size(self) -> int:
        return self._handle.tell()

    @property
    def pending_bytes(self) -> int:
        return self.size - self.offset

    def append(self, lines: list[bytes]) -> None:
        self._handle.write(b"".join(line + b"\n" for line in lines))
        self._handle.flush()

    def read(self, max_events: int) -> tuple[list[tuple[int, bytes]], int]:
        """Up to ``max_events`` unconfirmed lines, each with its byte offset in the file,
        and the offset just after them."""
        with self.path.open("rb") as reader:
            reader.seek(self.offset)
            lines: list[tuple[int, bytes]] = []
            end = self.offset
            for line in reader:
                if not line.endswith(b"\n") or len(lines) == max_events:
                    break
                lines.append((end, line.rstrip(b"\n")))
                end += len(line)
        return lines, end

    def confirm(self, offset: int) -> None:
        """The broker confirmed everything before ``offset``."""
        self.offset = offset
        if self.offset >= self.size:
            self._handle.truncate(0)
            self._handle.seek(0)
            self.offset = 0
        write_atomically(self.offset_path, str(self.offset).encode(), durable=False)

    def prepend(self, lines: list[bytes]) -> None:
        """Put ``lines`` before every unconfirmed event (used at shutdown for events that
        were queued in memory, which are older than what was already spooled)."""
        if not lines:
            return
        unread, _ = self.read(max_events=2**62)
        older_first = [*lines, *(line for _, line in unread)]
        self._handle.close()
        write_atomically(self.path, b"".join(line + b"\n" for line in older_first),
                         durable=False)
        self._handle = self.path.open("ab")
        self.confirm(0)

    def sync(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self.sync()
        self._handle.close()
