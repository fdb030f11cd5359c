"""Publishing through a FastStream broker, so one test body runs on FastStream's in-memory
TestKafkaBroker and on the real broker alike."""

from faststream.kafka import KafkaBroker

from routemesh.contracts import CONTENT_TYPE, Event, encode_event
from routemesh.services.runtime.kafka import Publish, event_address
from routemesh.services.runtime.settings import ServiceSettings


def broker_publish(broker: KafkaBroker, settings: ServiceSettings) -> Publish:
    async def publish(event: Event) -> None:
        topic, key = event_address(settings, event)
        await broker.publish(encode_event(event), topic=topic, key=key,
                             headers={"content-type": CONTENT_TYPE})

    return publish
