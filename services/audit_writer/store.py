"""Daily JSONL audit files: durable batch appends, size rotation, gzip, retention, and
the dedup index that survives restarts (rebuilt from the files themselves).

Each Kafka partition has its own files (``2026-11-23-p3.jsonl``): the writer that owns a
partition in the consumer group is the only one that writes them, so several writers share
one directory, and a partition's dedup state moves with it by reading its files when it is
assigned. Files without a partition are a trail written before partition files; they hold
every partition's records and are read by every writer."""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import IO, Literal

import msgspec

from routemesh.services.audit_writer.records import AuditRecord, RecordProblem, read_record

log = logging.getLogger(__name__)
FILE_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:-p(\d+))?(?:\.(\d+))?\.jsonl(\.gz)?$")
FsyncPolicy = Literal["batch", "off"]
# The partition of a file written before partition files: it holds every partition's.
UNPARTITIONED = -1


@dataclass(frozen=True, order=True)
class AuditFile:
    day: str
    partition: int
    part: int
    path: Path = field(compare=False)
    compressed: bool = field(compare=False)


def file_name(day: str, partition: int, part: int) -> str:
    stem = day if partition == UNPARTITIONED else f"{day}-p{partition}"
    return f"{stem}.jsonl" if part == 0 else f"{stem}.{part}.jsonl"


def list_files(directory: Path) -> list[AuditFile]:
    """Audit files in ``directory``, oldest first. A file caught being compressed (its
    ``.gz`` complete, the plain file not yet removed) is listed once, as the plain file."""
    found: dict[tuple[str, int, int], AuditFile] = {}
    for path in directory.iterdir() if directory.is_dir() else ():
        match = FILE_NAME.match(path.name)
        if match:
            partition = UNPARTITIONED if match.group(2) is None else int(match.group(2))
            file = AuditFile(match.group(1), partition, int(match.group(3) or 0), path,
                             bool(match.group(4)))
            key = (file.day, file.partition, file.part)
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


def _size(path: Path) -> int:
    """0 for a file another writer compressed or deleted since it was listed."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@dataclass
class RequestState:
    partition: int = UNPARTITIONED
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
        # Partitions whose files are in the index (UNPARTITIONED: the old files, too).
        self._loaded: set[int] = set()
        # (day, partition) -> the file being appended to.
        self._open: dict[tuple[str, int], tuple[AuditFile, IO[bytes]]] = {}
        self._encoder = msgspec.json.Encoder()
        directory.mkdir(parents=True, exist_ok=True)

    # -- dedup index -------------------------------------------------------------------

    @property
    def loaded(self) -> frozenset[int]:
        """The partitions whose files are in the index."""
        return frozenset(self._loaded - {UNPARTITIONED})

    def load_index(self, partitions: Collection[int]) -> int:
        """Add the records of ``partitions``' files to the index, oldest first, so the
        newest entries stay when it is full. Files without a partition are read once,
        with the first partitions. A torn last line (a crash mid-write) is skipped.
        Returns the records read."""
        wanted = {*partitions, UNPARTITIONED} - self._loaded
        count = 0
        for file in list_files(self.directory):
            if file.partition not in wanted:
                continue
            for _, line in read_lines(file):
                try:
                    record = read_record(line)
                except RecordProblem:
                    continue
                self.mark(record, file.partition)
                count += 1
        self._loaded |= wanted
        return count

    def forget_partitions(self, partitions: Collection[int]) -> None:
        """Another writer owns these partitions now: drop their index entries (read again
        from their files if they come back, with what the other writer added) and close
        their files."""
        gone = set(partitions)
        for request_id in [r for r, state in self._index.items() if state.partition in gone]:
            del self._index[request_id]
        for key in [k for k in self._open if k[1] in gone]:
            self._open.pop(key)[1].close()
        self._loaded -= gone

    def rebuild_index(self) -> int:
        """After a failed write, records marked for the batch may not be on disk: the index
        is read again from the files of the partitions it held."""
        partitions = set(self._loaded)
        self._index.clear()
        self._loaded.clear()
        return self.load_index(partitions)

    def state(self, request_id: str) -> RequestState | None:
        return self._index.get(request_id)

    def mark(self, record: AuditRecord, partition: int = UNPARTITIONED) -> None:
        """Remember a record as written (or about to be, in the batch being built)."""
        request_id = record.request_id
        state = self._index.pop(request_id, None) or RequestState(partition)
        state.has_decision |= record.decision is not None
        state.has_observation |= record.observation is not None
        state.event_ids.update(record.event_ids)
        self._index[request_id] = state
        while len(self._index) > self.dedup_capacity:
            self._index.popitem(last=False)

    # -- writing -----------------------------------------------------------------------

    def _handle(self, day: str, partition: int) -> tuple[AuditFile, IO[bytes]]:
        key = (day, partition)
        current = self._open.get(key)
        if current is not None and current[1].tell() < self.max_file_bytes:
            return current
        if current is not None:
            current[1].close()
            del self._open[key]
        parts = [f for f in list_files(self.directory) if (f.day, f.partition) == key]
        last = parts[-1] if parts else None
        if (
            last is not None
            and not last.compressed
            and last.path.stat().st_size < self.max_file_bytes
        ):
            file = last
        else:
            part = last.part + 1 if last else 0
            file = AuditFile(day, partition, part,
                             self.directory / file_name(day, partition, part), False)
        _cut_torn_tail(file.path)
        handle = open(file.path, "ab")  # noqa: SIM115 (kept open across batches)
        self._open[key] = (file, handle)
        return self._open[key]

    def append(self, records: Sequence[AuditRecord], partition: int = UNPARTITIONED
               ) -> tuple[float, float]:
        """Write one partition's records to their day files; durable (flushed, fsynced) on
        return. Returns the seconds spent writing and fsyncing."""
        started = time.perf_counter()
        touched: dict[str, IO[bytes]] = {}
        for record in records:
            _, handle = self._handle(record.day, partition)
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
        self, today: date, *, retention_days: int, retention_bytes: int,
        partitions: Collection[int] | None = None,
    ) -> tuple[list[Path], list[Path]]:
        """Delete files past the retention age, gzip the rest of the past days, then
        delete oldest first while the directory's total exceeds the size limit. Only the
        files of ``partitions`` (None: all), those this writer owns: another writer may be
        appending to the rest. Files without a partition go with partition 0. Never touches
        a file that is open for writing. Returns (compressed, deleted)."""
        for key in [k for k in self._open if k[0] < today.isoformat()]:
            self._open.pop(key)[1].close()
        open_paths = {file.path for file, _ in self._open.values()}
        owned = None if partitions is None else set(partitions)
        if owned is not None and 0 in owned:
            owned.add(UNPARTITIONED)

        def mine() -> list[AuditFile]:
            return [f for f in list_files(self.directory)
                    if (owned is None or f.partition in owned) and f.path not in open_paths]

        deleted = []
        cutoff = (today - timedelta(days=retention_days)).isoformat()
        for file in mine():
            if file.day < cutoff:
                file.path.unlink()
                deleted.append(file.path)
                log.info("retention deleted an audit file",
                         extra={"file": file.path.name, "reason": "age",
                                "retention_days": retention_days})
        compressed = []
        for file in mine():
            if file.compressed or file.day >= today.isoformat():
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
        total = sum(_size(f.path) for f in list_files(self.directory))
        for file in mine():
            if total <= retention_bytes:
                break
            total -= _size(file.path)
            file.path.unlink()
            deleted.append(file.path)
            log.info("retention deleted an audit file",
                     extra={"file": file.path.name, "reason": "size",
                            "retention_bytes": retention_bytes})
        return compressed, deleted
