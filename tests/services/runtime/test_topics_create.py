"""`routemesh topics create` says what the broker refused: the admin client returns
per-topic errors instead of raising, and a hook that printed "N topics created" on a
refusal would let an install go on without its topics."""

from types import SimpleNamespace

from typer.testing import CliRunner

from routemesh.contracts import TOPICS
from routemesh.contracts.topics import REPLAY_REQUESTS, STATE_TOPICS
from routemesh.services.cli.main import app
from routemesh.services.runtime import kafka
from routemesh.services.runtime.kafka import refusals

INVALID_REPLICATION_FACTOR, TOPIC_AUTHORIZATION_FAILED, TOPIC_ALREADY_EXISTS = 38, 29, 36


def test_refusals_name_each_topic_and_its_error_and_skip_a_race():
    found = refusals([("a", 0, None), ("b", INVALID_REPLICATION_FACTOR, "only 1 broker"),
                      ("c", TOPIC_AUTHORIZATION_FAILED, None), ("d", TOPIC_ALREADY_EXISTS, "x")])
    assert found[0] == "b: InvalidReplicationFactorError (only 1 broker)"
    assert found[1].startswith("c: TopicAuthorizationFailedError (")
    assert len(found) == 2


class RefusingAdmin:
    def __init__(self, **kwargs) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def list_topics(self) -> list[str]:
        return []

    async def create_topics(self, topics):
        return SimpleNamespace(topic_errors=[
            (t.name, INVALID_REPLICATION_FACTOR, "replication factor 3 > 1 broker")
            for t in topics])


def test_the_command_exits_non_zero_naming_the_refused_topic(monkeypatch):
    monkeypatch.setattr(kafka, "AIOKafkaAdminClient", RefusingAdmin)
    result = CliRunner().invoke(app, ["topics", "create", "--replication-factor", "3"])
    assert result.exit_code == 1
    assert "refused to create topics" in result.output
    assert "routemesh.route.decisions.v1: InvalidReplicationFactorError" in result.output
    assert "topics created" not in result.output


class OldAdmin(RefusingAdmin):
    """A broker whose topics an older release made: replay requests on one partition."""

    async def list_topics(self) -> list[str]:
        return [t.name() for t in TOPICS]

    async def create_topics(self, topics):
        return SimpleNamespace(topic_errors=[(t.name, 0, None) for t in topics])

    async def describe_topics(self, names):
        return [{"topic": name, "partitions": [{"partition": p} for p in range(
            1 if name == REPLAY_REQUESTS.name() else 6)]} for name in names]


def test_the_command_says_which_existing_topic_has_fewer_partitions_than_it_makes(
        monkeypatch):
    monkeypatch.setattr(kafka, "AIOKafkaAdminClient", OldAdmin)
    result = CliRunner().invoke(app, ["topics", "create"])
    assert result.exit_code == 0, result.output
    assert f"{len(STATE_TOPICS)} topics created" in result.output, (
        "the changelogs, new in this release")
    assert (f"{REPLAY_REQUESTS.name()} has 1 partitions, fewer than the 6 this release "
            "makes: no more than 1 instances") in result.output
    assert "decisions" not in result.output
