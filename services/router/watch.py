"""A routing config that a long-running consumer reads at start and again when one of
its files changes. A config that does not load is logged and the last good one kept."""

from __future__ import annotations

import logging
from pathlib import Path

from routemesh.services.router.config import ConfigError, LoadedConfig, load_config
from routemesh.services.runtime.files import FileWatch

log = logging.getLogger(__name__)


class WatchedConfig:
    def __init__(self, path: Path | None, name: str | None = None) -> None:
        self.path, self.name = path, name
        self._watch: FileWatch | None = None

    def load(self) -> LoadedConfig | None:
        """The config as it is now; None without a path or when it does not load."""
        if self.path is None:
            return None
        try:
            loaded = load_config(self.path, self.name)
        except (ConfigError, OSError, ValueError) as exc:
            # Whatever is wrong with the file, the consumer reading it goes on.
            log.warning("routing config not read; keeping the last one that loaded",
                        extra={"error": str(exc)})
            self._watch = self._watch or FileWatch([self.path])
            return None
        self._watch = FileWatch(loaded.files)
        return loaded

    def changed(self) -> bool:
        return self._watch is not None and self._watch.changed()
