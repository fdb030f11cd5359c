"""Hot reload: a changed config file or a RouteBankPublished event builds a new router
in the background and swaps it in; a broken config is refused and the last good one
keeps serving."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from routemesh.contracts import RouteBankPublished

log = logging.getLogger(__name__)
# Requests in flight keep the router they started with; it is closed after this grace.
RETIRE_AFTER_S = 30.0
# A bank announced this long before the current router started loading is in it (or a
# newer one is): a build reads the bank as it is then. The allowance is for the clocks
# of the announcing host and this one disagreeing.
CLOCK_SKEW_S = 60.0


class Reloader:
    def __init__(
        self,
        state: Any,
        config_path: Path,
        build: Callable[[], Any],
        registry: CollectorRegistry,
        interval_s: float = 2.0,
        built_at: float | None = None,
    ) -> None:
        self.state = state
        # When the serving router began loading (epoch seconds).
        self.built_at = time.time() if built_at is None else built_at
        self.config_path = config_path
        self.build = build
        self.interval_s = interval_s
        self._stamp = self._file_stamp()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.reloads = Counter("routemesh_gateway_config_reloads_total",
                               "Config and route bank reloads by result", ["trigger", "result"],
                               registry=registry)

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.config_path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    async def check_file(self) -> bool | None:
        """Reload if the file changed: True on success, False if refused, None if unchanged."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        return await self.reload("config_file")

    async def reload(self, trigger: str) -> bool:
        async with self._lock:
            started = time.time()
            try:
                router = await asyncio.to_thread(self.build)
            except Exception as exc:
                self.reloads.labels(trigger, "refused").inc()
                log.error("reload refused; the last good config keeps serving",
                          extra={"trigger": trigger, "error": str(exc)})
                return False
            old, self.state.router = self.state.router, router
            self.built_at = started
            self.reloads.labels(trigger, "ok").inc()
            log.info("router reloaded", extra={
                "trigger": trigger, "config_sha256": router.loaded.sha256,
                "route_bank_sha256": router.matcher.sha256 if router.matcher else None,
            })
            asyncio.get_running_loop().call_later(
                RETIRE_AFTER_S, lambda: asyncio.ensure_future(old.aclose())
            )
            return True

    async def on_bank_published(self, event: RouteBankPublished) -> None:
        """Reload for a bank that is not the one serving. The topic is read from its start
        at every start of the gateway: announcements older than the serving router are
        history it already reflects, and reloading for each would load it again."""
        current = self.state.router.matcher
        if current is not None and current.sha256 == event.route_bank_sha256:
            return
        if event.occurred_at.timestamp() < self.built_at - CLOCK_SKEW_S:
            return
        await self.reload("routebank_changes")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check_file()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
