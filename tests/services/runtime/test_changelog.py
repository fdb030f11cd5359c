"""The changelog's rules without a broker: what a restore keeps, and a topic refused."""

import pytest
from aiokafka.errors import KafkaTimeoutError

from routemesh.contracts.topics import SCORER_CHANGELOG
from routemesh.services.runtime.changelog import MARK, Changelog, ChangelogMismatch, fold
from routemesh.services.runtime.settings import ServiceSettings


def test_a_restore_keeps_what_the_last_mark_covers():
    restored = fold([(b"a", b"1"), (b"b", b"1"), (MARK, b"m1"),
                     (b"a", b"2"), (b"b", None), (MARK, b"m2"),
                     (b"a", b"3"), (b"c", b"1")])
    assert restored.values == {b"a": b"2"}
    assert restored.mark == b"m2"
    assert restored.torn == {b"a", b"c"}


class Producer:
    def __init__(self, partitions) -> None:
        self.partitions, self.stopped = partitions, False

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True

    async def partitions_for(self, topic):
        if self.partitions is None:
            raise KafkaTimeoutError()
        return set(range(self.partitions))


@pytest.mark.parametrize(("partitions", "said"), [(1, "has 1 partitions"),
                                                  (None, "has 0 partitions")])
async def test_a_changelog_unlike_its_inputs_is_refused_at_start(partitions, said):
    log = Changelog(ServiceSettings(), SCORER_CHANGELOG, "unit")
    log._producer = Producer(partitions)
    with pytest.raises(ChangelogMismatch, match=f"{said} and must have 6"):
        await log.start()
    assert log._producer.stopped


async def test_a_changelog_like_its_inputs_starts():
    log = Changelog(ServiceSettings(), SCORER_CHANGELOG, "unit")
    log._producer = Producer(6)
    await log.start()
    assert not log._producer.stopped
