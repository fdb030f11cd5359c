"""Hot reload: a changed config file (or a file it names, such as an utterances file) or a
RouteBankPublished event builds a new router in the background and swaps it in; a broken
config is refused and the last good one keeps serving."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from routemesh.contracts import RouteBankPublished
from routemesh.services.router import ConfigError, Router
from routemesh.services.runtime.files import FileWatch

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
        build: Callable[[], Router],
        registry: CollectorRegistry,
        interval_s: float = 2.0,
        built_at: float | None = None,
    ) -> None:
        self.state = state
        # When the serving router began loading (epoch seconds).
        self.built_at = time.time() if built_at is None else built_at
        self.build = build
        self.interval_s = interval_s
        self._files = FileWatch(state.router.loaded.files)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.reloads = Counter("routemesh_gateway_config_reloads_total",
                               "Config and route bank reloads by result", ["trigger", "result"],
                               registry=registry)

    async def check_file(self) -> bool | None:
        """Reload if the config or a file it names changed: True on success, False if
        refused, None if unchanged."""
        if not await asyncio.to_thread(self._files.changed):
            return None
        return await self.reload("config_file")

    async def reload(self, trigger: str) -> bool:
        async with self._lock:
            started = time.time()
            try:
                router = await asyncio.to_thread(self.build)
            except Exception as exc:
                self.reloads.labels(trigger, "refused").inc()
                # A config error names the config by its logical name and line; other
                # errors may quote local paths, so only their kind is logged.
                error = str(exc) if isinstance(exc, ConfigError) else type(exc).__name__
                log.error("reload refused; the last good config keeps serving",
                          extra={"trigger": trigger, "error": error})
                return False
            old, self.state.router = self.state.router, router
            # Watch the files the new config names (one may have been added).
            self._files = FileWatch(router.loaded.files)
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
