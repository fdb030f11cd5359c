"""A service on the consumer runtime, for its tests against the real broker.

It appends ``<instance> <request_id> <event_id> <topic> <partition> <offset>`` for every
event delivered to it (``delivered.log``) and, durably, for every event whose effect it
made (``effects.log``, fsynced before the handler returns). An event whose request id
starts with ``hold-`` is held (its effect never made), so its partition's commit cannot
pass it. Effects are deduplicated on ``event_id`` against the effects log, as a real
service's durable state would be, so a redelivery after a crash is recognised.
"""

import asyncio
import os
from pathlib import Path

from routemesh.contracts.topics import ROUTE_DECISIONS
from routemesh.services.runtime.service import ServiceContext, ServiceSpec, metrics_port
from routemesh.services.runtime.settings import ServiceSettings


class BatchSettings(ServiceSettings):
    batch_out: Path = Path("batch-out")
    # Seconds each batch takes before its effect is durable (to be caught mid-batch).
    batch_delay_s: float = 0.0


class BatchSample:
    def __init__(self, ctx: ServiceContext) -> None:
        self.settings: BatchSettings = ctx.settings  # type: ignore[assignment]
        self.ctx = ctx
        self.name = self.settings.instance_id or "single"
        self.settings.batch_out.mkdir(parents=True, exist_ok=True)
        self.effects_path = self.settings.batch_out / "effects.log"
        self.effects_path.touch()
        self.done = {line.split()[2] for line in self.effects_path.read_text().splitlines()}
        self.consumer = ctx.consumer([ROUTE_DECISIONS], "batch-sample", self,
                                     batch_max_records=50)

    async def start(self) -> None:
        await self.consumer.start()
        self.ctx.readiness.set("batch", True)

    async def stop(self) -> None:
        await self.consumer.stop()

    def revoked(self, partitions) -> None:
        pass

    async def handle(self, deliveries, offsets) -> None:
        lines, effects = [], []
        for delivery in deliveries:
            event = delivery.event
            topic, partition, offset = delivery.position
            line = f"{self.name} {event.request_id} {event.event_id} {topic} {partition} {offset}\n"
            lines.append(line)
            if event.request_id.startswith("hold-"):
                offsets.hold(delivery.position)
            elif str(event.event_id) not in self.done:
                effects.append(line)
                self.done.add(str(event.event_id))
        with (self.settings.batch_out / "delivered.log").open("a") as log:
            log.writelines(lines)
        if effects:
            await asyncio.sleep(self.settings.batch_delay_s)
            with self.effects_path.open("a") as out:
                out.writelines(effects)
                out.flush()
                os.fsync(out.fileno())


SPEC = ServiceSpec(name="batch-sample", settings_class=BatchSettings, factory=BatchSample,
                   ports=(metrics_port(0),))

if __name__ == "__main__":
    from routemesh.services.runtime.service import run

    asyncio.run(run(SPEC))
