"""Inbound API keys, stored as sha256 hashes; a key file is re-read when its content
changes, so a key can be rotated (add the new hash, move clients, drop the old) without a
restart."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import time
from pathlib import Path

from routemesh.services.runtime.files import FileWatch

_HASH = re.compile(r"^[0-9a-f]{64}$")


class KeyFileError(ValueError):
    pass


def parse_hashes(text: str, source: str) -> frozenset[str]:
    hashes = set()
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if not _HASH.match(entry):
            raise KeyFileError(f"{source}:{number}: not a sha256 hex digest")
        hashes.add(entry)
    return frozenset(hashes)


class ApiKeys:
    def __init__(
        self, inline: str = "", key_file: Path | None = None, check_every_s: float = 1.0
    ) -> None:
        self.inline = parse_hashes(inline.replace(",", "\n"), "ROUTEMESH_AUTH_KEY_SHA256")
        self.key_file = key_file
        self.check_every_s = check_every_s
        self._file_hashes: frozenset[str] = frozenset()
        self._watch = FileWatch([key_file]) if key_file is not None else None
        self._loaded = False
        self._checked = 0.0
        self._reload()
        if not self.active():
            raise KeyFileError(
                "inbound auth is on but no key hashes are configured "
                "(ROUTEMESH_AUTH_KEY_SHA256 or ROUTEMESH_AUTH_KEYS_FILE)"
            )

    def _reload(self) -> None:
        if self.key_file is None or self._watch is None:
            return
        if self._loaded and not self._watch.changed():
            return
        # A broken file keeps the last good keys (raises only on the first load).
        try:
            self._file_hashes = parse_hashes(self.key_file.read_text(), self.key_file.name)
        except KeyFileError:
            if not self._loaded:
                raise
        self._loaded = True

    def active(self) -> frozenset[str]:
        now = time.monotonic()
        if now - self._checked >= self.check_every_s:
            self._checked = now
            # A key file briefly missing (replaced by a deploy) keeps the last good keys.
            with contextlib.suppress(OSError):
                self._reload()
        return self.inline | self._file_hashes

    def allows(self, authorization: str | None) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        digest = hashlib.sha256(authorization[7:].strip().encode()).hexdigest()
        # Compare against every active hash, in constant time each, so the answer's
        # timing says nothing about which keys exist.
        matched = False
        for known in self.active():
            matched |= hmac.compare_digest(digest, known)
        return matched
