"""Noticing that files changed, for whatever the mesh re-reads while running (route
configs and their utterance files, key files)."""

from __future__ import annotations

import gzip
import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, TypeVar

import msgspec

T = TypeVar("T")


def files_sha256(paths: Iterable[Path], *, named: bool = False) -> str:
    """sha256 over files' bytes in the given order, each length-prefixed (and, when
    ``named``, preceded by its file name): any byte changed changes it."""
    digest = hashlib.sha256()
    for path in paths:
        data = path.read_bytes()
        prefix = path.name.encode() + b"\0" if named else b""
        digest.update(prefix + len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class FileWatch:
    """Reports a change of content in any of ``paths`` (a file appearing or going away
    included). By content, not by modification time and size: a key swapped for one of
    the same length within the filesystem's timestamp granularity is still a change."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.paths = tuple(paths)
        self._seen = self._digests()

    def _digests(self) -> tuple[str | None, ...]:
        return tuple(_digest(path) for path in self.paths)

    def changed(self) -> bool:
        """True once per change since the last call (or since the watch was made)."""
        now = self._digests()
        if now == self._seen:
            return False
        self._seen = now
        return True


def read_if_present(path: Path) -> bytes | None:
    """The file's content, or None when there is no such file (a first start)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def write_atomically(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so a reader (or a restart after a crash) sees the old
    content or the new, never a part. ``durable``: on disk before returning, the rename
    included."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as sink:
        sink.write(data)
        if durable:
            sink.flush()
            os.fsync(sink.fileno())
    os.replace(partial, path)
    if durable:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def open_private(path: Path, *, append: bool = False) -> IO[str]:
    """A text file only its owner can read (0600; a directory this makes is 0700), for
    prompt text a reviewer asked for: it stays on this machine and this account, whatever
    the umask. A file that existed is made 0600 too."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    descriptor = os.open(path, flags, 0o600)
    os.fchmod(descriptor, 0o600)
    return os.fdopen(descriptor, "a" if append else "w", encoding="utf-8")


def pretty_json(value: object) -> bytes:
    """``value`` as indented JSON with a final newline: the format of report files."""
    return msgspec.json.format(msgspec.json.encode(value), indent=2) + b"\n"


class Skipped:
    """The lines a reader of JSON-lines files passed over, by file name and reason: a
    reader says what it did not read instead of skipping it silently."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def add(self, file: str, reason: str) -> None:
        self.counts[(file, reason)] += 1

    def by_file(self) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = {}
        for (file, reason), count in sorted(self.counts.items()):
            found.setdefault(file, {})[reason] = count
        return found


def reasons_text(reasons: Mapping[str, int]) -> str:
    """One file's skipped lines in words: ``2 not_json, 1 not_a_record``."""
    return ", ".join(f"{n} {reason}" for reason, n in reasons.items())


def unreadable(exc: msgspec.DecodeError) -> str:
    """Why a line was not read: not JSON at all, or JSON of another shape."""
    return "not_a_record" if isinstance(exc, msgspec.ValidationError) else "not_json"


def jsonl_files(directory: Path) -> list[Path]:
    """``directory``'s ``*.jsonl`` files and their compressed ``*.jsonl.gz`` copies, by
    name. A file caught while being compressed (both present) is listed once, plain."""
    plain = sorted(directory.glob("*.jsonl"))
    names = {p.name for p in plain}
    packed = [p for p in sorted(directory.glob("*.jsonl.gz")) if p.name[:-3] not in names]
    return sorted(plain + packed, key=lambda p: p.name)


def numbered_rows(path: Path, decoder: msgspec.json.Decoder[T],
                  what: str = "") -> Iterator[tuple[int, T]]:
    """(line number, row) of every non-blank line of a JSON-lines file a person wrote;
    ValueError names the first line ``decoder`` refuses (``file:line: [what] why``)."""
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, decoder.decode(line)
        except msgspec.DecodeError as exc:
            why = f"{what} ({exc})" if what else str(exc)
            raise ValueError(f"{path.name}:{number}: {why}") from None


def decoded_lines(directory: Path, decoder: msgspec.json.Decoder[T],
                  skipped: Skipped | None = None) -> Iterator[T]:
    """Every line of ``directory``'s JSON-lines files, plain or gzip (``jsonl_files``),
    that ``decoder`` reads; the others are counted in ``skipped`` by file and reason."""
    for path in jsonl_files(directory):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    yield decoder.decode(line)
                except msgspec.DecodeError as exc:
                    if skipped is not None:
                        skipped.add(path.name, unreadable(exc))
