"""Daily JSONL audit files: durable batch appends, size rotation, gzip, retention, and
the dedup index that survives restarts (rebuilt from the files themselves)."""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import IO, Literal

import msgspec

from routemesh.services.audit_writer.records import AuditRecord, RecordProblem, read_record

log = logging.getLogger(__name__)
FILE_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:\.(\d+))?\.jsonl(\.gz)?$")
FsyncPolicy = Literal["batch", "off"]


@dataclass(frozen=True, order=True)
class AuditFile:
    day: str
    part: int
    path: Path = field(compare=False)
    compressed: bool = field(compare=False)


def list_files(directory: Path) -> list[AuditFile]:
    """Audit files in ``directory``, oldest first. A file caught being compressed (its
    ``.gz`` complete, the plain file not yet removed) is listed once, as the plain file."""
    found: dict[tuple[str, int], AuditFile] = {}
    for path in directory.iterdir() if directory.is_dir() else ():
        match = FILE_NAME.match(path.name)
        if match:
            file = AuditFile(match.group(1), int(match.group(2) or 0), path, bool(match.group(3)))
            key = (file.day, file.part)
            if key not in found or found[key].compressed:
                found[key] = file
    return sorted(found.values())


def read_lines(file: AuditFile) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a plain or gzip file, streamed. The writer may compress or
    delete files while a reader lists them: a plain file that was compressed since is read
    from its ``.gz``, one that was deleted (retention) reads as empty."""
    path, compressed = file.path, file.compressed
    if not compressed and not path.exists():
        path, compressed = path.with_name(path.name + ".gz"), True
    opener = gzip.open if compressed else open
    try:
        handle = opener(path, "rb")
    except FileNotFoundError:
        return
    with handle:
        yield from enumerate(handle, start=1)


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a crash mid-write) before appending, or the
    next record would be glued to it and both lost. The torn record was never committed
    (offsets move only after a batch is fsynced), so Kafka delivers its events again."""
    if not path.exists():
        return
    with path.open("r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        start = max(0, size - 1024 * 1024)
        handle.seek(start)
        tail = handle.read()
        cut = start + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        handle.truncate(cut)
        handle.flush()
        os.fsync(handle.fileno())
    log.warning("cut a torn last line from an audit file",
                extra={"file": path.name, "bytes": size - cut})


@dataclass
class RequestState:
    has_decision: bool = False
    has_observation: bool = False
    event_ids: set[str] = field(default_factory=set)


class AuditStore:
    def __init__(
        self,
        directory: Path,
        *,
        max_file_bytes: int = 256 * 1024 * 1024,
        fsync: FsyncPolicy = "batch",
        dedup_capacity: int = 1_000_000,
    ) -> None:
        self.directory = directory
        self.max_file_bytes = max_file_bytes
        self.fsync = fsync
        self.dedup_capacity = dedup_capacity
        self._index: OrderedDict[str, RequestState] = OrderedDict()
        self._open: dict[str, tuple[AuditFile, IO[bytes]]] = {}
        self._encoder = msgspec.json.Encoder()
        directory.mkdir(parents=True, exist_ok=True)

    # -- dedup index -------------------------------------------------------------------

    def load_index(self) -> int:
        """Rebuild the index from the files, oldest first, so the newest entries stay
        when it is full. A torn last line (a crash mid-write) is skipped."""
        count = 0
        for file in list_files(self.directory):
            for _, line in read_lines(file):
                try:
                    record = read_record(line)
                except RecordProblem:
                    continue
                self.mark(record)
                count += 1
        return count

    def state(self, request_id: str) -> RequestState | None:
        return self._index.get(request_id)

    def mark(self, record: AuditRecord) -> None:
        """Remember a record as written (or about to be, in the batch being built)."""
        request_id = record.request_id
        state = self._index.pop(request_id, None) or RequestState()
        state.has_decision |= record.decision is not None
        state.has_observation |= record.observation is not None
        state.event_ids.update(record.event_ids)
        self._index[request_id] = state
        while len(self._index) > self.dedup_capacity:
            self._index.popitem(last=False)

    # -- writing -----------------------------------------------------------------------

    def _handle(self, day: str) -> tuple[AuditFile, IO[bytes]]:
        current = self._open.get(day)
        if current is not None and current[1].tell() < self.max_file_bytes:
            return current
        if current is not None:
            current[1].close()
            del self._open[day]
        parts = [f for f in list_files(self.directory) if f.day == day]
        last = parts[-1] if parts else None
        if (
            last is not None
            and not last.compressed
            and last.path.stat().st_size < self.max_file_bytes
        ):
            file = last
        else:
            part = last.part + 1 if last else 0
            name = f"{day}.jsonl" if part == 0 else f"{day}.{part}.jsonl"
            file = AuditFile(day, part, self.directory / name, False)
        _cut_torn_tail(file.path)
        handle = open(file.path, "ab")  # noqa: SIM115 (kept open across batches)
        self._open[day] = (file, handle)
        return self._open[day]

    def forget_index(self) -> None:
        """Drop the index (rebuild it with ``load_index``): after a failed write, records
        marked for the batch may not be on disk."""
        self._index.clear()

    def append(self, records: list[AuditRecord]) -> tuple[float, float]:
        """Write records to their day files; durable (flushed, fsynced) on return.
        Returns the seconds spent writing and fsyncing."""
        started = time.perf_counter()
        touched: dict[str, IO[bytes]] = {}
        for record in records:
            _, handle = self._handle(record.day)
            handle.write(self._encoder.encode(record) + b"\n")
            touched[record.day] = handle
        for handle in touched.values():
            handle.flush()
        written = time.perf_counter()
        if self.fsync == "batch":
            for handle in touched.values():
                os.fsync(handle.fileno())
        return written - started, time.perf_counter() - written

    def close(self) -> None:
        for _, handle in self._open.values():
            handle.flush()
            if self.fsync == "batch":
                os.fsync(handle.fileno())
            handle.close()
        self._open.clear()

    # -- compression and retention -----------------------------------------------------

    def maintain(
        self, today: date, *, retention_days: int, retention_bytes: int
    ) -> tuple[list[Path], list[Path]]:
        """Delete files past the retention age, gzip the rest of the past days, then
        delete oldest first while the total exceeds the size limit. Never touches a file
        that is open for writing. Returns (compressed, deleted)."""
        for day in [d for d in self._open if d < today.isoformat()]:
            self._open.pop(day)[1].close()
        open_paths = {file.path for file, _ in self._open.values()}
        deleted = []
        cutoff = (today - timedelta(days=retention_days)).isoformat()
        for file in list_files(self.directory):
            if file.day < cutoff and file.path not in open_paths:
                file.path.unlink()
                deleted.append(file.path)
                log.info("retention deleted an audit file",
                         extra={"file": file.path.name, "reason": "age",
                                "retention_days": retention_days})
        compressed = []
        for file in list_files(self.directory):
            if file.compressed or file.day >= today.isoformat() or file.path in open_paths:
                continue
            # Not open for writing, so a torn last line is a crash's; it was never
            # committed and is written again from Kafka: it must not be archived.
            _cut_torn_tail(file.path)
            target = file.path.with_name(file.path.name + ".gz")
            partial = target.with_name(target.name + ".partial")
            with open(file.path, "rb") as source, gzip.open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink)
            with open(partial, "rb") as done:
                os.fsync(done.fileno())
            partial.rename(target)
            file.path.unlink()
            compressed.append(target)
        files = [f for f in list_files(self.directory) if f.path not in open_paths]
        total = sum(f.path.stat().st_size for f in list_files(self.directory))
        for file in files:
            if total <= retention_bytes:
                break
            total -= file.path.stat().st_size
            file.path.unlink()
            deleted.append(file.path)
            log.info("retention deleted an audit file",
                     extra={"file": file.path.name, "reason": "size",
                            "retention_bytes": retention_bytes})
        return compressed, deleted
