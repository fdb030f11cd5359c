"""A minimal service for lifecycle tests: records each event it handles to a file,
taking ``SAMPLE_DELAY_S`` per event so a shutdown can catch one in flight; with
``SAMPLE_START_HANGS`` its start never ends, as a consumer's whose group never settles."""

import asyncio
import os
from pathlib import Path

from routemesh.contracts.topics import ROUTE_DECISIONS
from routemesh.services.runtime.kafka import subscribe_events
from routemesh.services.runtime.service import ServiceContext, ServiceSpec, metrics_port
from routemesh.services.runtime.settings import ServiceSettings


class SampleSettings(ServiceSettings):
    sample_out: Path = Path("sample.out")
    sample_delay_s: float = 0.0
    sample_start_hangs: bool = False


class Sample:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        subscribe_events(
            ctx.broker,
            ctx.settings,
            [ROUTE_DECISIONS],
            group_id="sample",
            handler=self.handle,
            dead_letters=ctx.dead_letters,
        )

    async def start(self) -> None:
        settings: SampleSettings = self.ctx.settings  # type: ignore[assignment]
        if settings.sample_start_hangs:
            await asyncio.Event().wait()
        self.ctx.readiness.set("sample", True)

    async def stop(self) -> None:
        pass

    async def handle(self, event, msg) -> None:
        settings: SampleSettings = self.ctx.settings  # type: ignore[assignment]
        with settings.sample_out.open("a") as out:
            out.write(f"start {event.request_id}\n")
        await asyncio.sleep(settings.sample_delay_s)
        with settings.sample_out.open("a") as out:
            out.write(f"done {event.request_id}\n")
            out.flush()
            os.fsync(out.fileno())


SPEC = ServiceSpec(
    name="sample", settings_class=SampleSettings, factory=Sample, ports=(metrics_port(0),)
)

if __name__ == "__main__":
    from routemesh.services.runtime.service import run

    asyncio.run(run(SPEC))
