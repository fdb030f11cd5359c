"""Noticing that files changed, for whatever the mesh re-reads while running (route
configs and their utterance files, key files)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

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


def pretty_json(value: object) -> bytes:
    """``value`` as indented JSON with a final newline: the format of report files."""
    return msgspec.json.format(msgspec.json.encode(value), indent=2) + b"\n"


def decoded_lines(directory: Path, decoder: msgspec.json.Decoder[T]) -> Iterator[T]:
    """Every line of ``directory``'s ``*.jsonl`` files (by name) that ``decoder`` reads;
    the others are skipped (a torn last line, a line of another kind)."""
    for path in sorted(directory.glob("*.jsonl")):
        with path.open("rb") as handle:
            for line in handle:
                try:
                    yield decoder.decode(line)
                except msgspec.DecodeError:
                    continue
