import msgspec

from routemesh.contracts import OutcomeReported
from routemesh.services.audit_writer.joiner import Joiner
from routemesh.services.audit_writer.reports import verify
from routemesh.services.audit_writer.store import AuditStore
from routemesh.services.runtime.consumer import OffsetTracker
from tests.services.audit_writer.helpers import decision, observation

D, O = "decisions", "observations"  # noqa: E741 (topic initials)


def make(tmp_path, window=10.0):
    store = AuditStore(tmp_path)
    tracker = OffsetTracker()
    return Joiner(store, tracker, window), tracker, store


def feed(joiner, tracker, event, position, now=0.0):
    tracker.consumed(position)
    return joiner.add(event, position, now)


def test_a_pair_joins_in_either_order(tmp_path):
    joiner, tracker, _ = make(tmp_path)
    assert feed(joiner, tracker, decision("a"), (D, 0, 0)) == []
    (out,) = feed(joiner, tracker, observation("a"), (O, 0, 0))
    assert out.record.join == "joined"
    assert out.positions == [(D, 0, 0)]
    assert feed(joiner, tracker, observation("b"), (O, 0, 1)) == []
    (out,) = feed(joiner, tracker, decision("b"), (D, 0, 1))
    assert out.record.join == "joined"


def test_a_held_message_holds_back_its_partitions_commit(tmp_path):
    joiner, tracker, _ = make(tmp_path)
    feed(joiner, tracker, decision("a"), (D, 0, 5))
    feed(joiner, tracker, decision("b"), (D, 0, 6))
    assert tracker.to_commit() == {(D, 0): 5}
    (out,) = feed(joiner, tracker, observation("a"), (O, 0, 9))
    for position in out.positions:
        tracker.release(position)
    assert tracker.to_commit() == {(D, 0): 6, (O, 0): 10}
    tracker.committed({(D, 0): 6, (O, 0): 10})
    assert tracker.to_commit() == {}


def test_the_window_writes_lonely_events(tmp_path):
    joiner, tracker, _ = make(tmp_path, window=10)
    feed(joiner, tracker, decision("a"), (D, 0, 0), now=0)
    feed(joiner, tracker, observation("b"), (O, 1, 0), now=5)
    assert joiner.expire(9) == []
    (first,) = joiner.expire(10)
    assert (first.record.join, first.record.observation) == ("decision_only", None)
    (second,) = joiner.expire(15)
    assert second.record.join == "observation_only"


def test_a_late_observation_becomes_an_amendment(tmp_path):
    joiner, tracker, _ = make(tmp_path, window=1)
    d = decision("a")
    feed(joiner, tracker, d, (D, 0, 0), now=0)
    joiner.expire(2)
    (out,) = feed(joiner, tracker, observation("a"), (O, 0, 0), now=3)
    assert out.record.join == "amendment"
    assert out.record.amends == str(d.event_id)
    assert out.record.decision is None


def test_redelivered_and_duplicated_events_are_skipped(tmp_path):
    joiner, tracker, store = make(tmp_path)
    d, o = decision("a"), observation("a")
    feed(joiner, tracker, d, (D, 0, 0))
    feed(joiner, tracker, d, (D, 0, 1))
    assert joiner.stats.dedup_hits == 1
    feed(joiner, tracker, o, (O, 0, 0))
    assert feed(joiner, tracker, o, (O, 0, 1)) == []
    assert feed(joiner, tracker, d, (D, 0, 2)) == []
    assert joiner.stats.dedup_hits == 3
    assert store.state("a").has_decision
    assert store.state("a").has_observation


def test_dropping_a_revoked_partition_forgets_what_it_held(tmp_path):
    joiner, tracker, _ = make(tmp_path)
    feed(joiner, tracker, decision("a"), (D, 3, 0))
    feed(joiner, tracker, decision("b"), (D, 4, 0))
    joiner.drop_partitions({(D, 3)})
    tracker.forget({(D, 3)})
    assert set(joiner.decisions) == {"b"}
    assert tracker.to_commit() == {(D, 4): 0}


def test_a_late_decision_after_an_observation_only_record_is_an_amendment(tmp_path):
    joiner, tracker, _ = make(tmp_path, window=1)
    o = observation("a")
    feed(joiner, tracker, o, (O, 0, 0), now=0)
    (lonely,) = joiner.expire(2)
    assert lonely.record.join == "observation_only"
    (out,) = feed(joiner, tracker, decision("a"), (D, 0, 0), now=3)
    assert (out.record.join, out.record.amends) == ("amendment", str(o.event_id))
    assert out.record.observation is None
    assert out.record.decision.route_id == "lite"


def test_an_outcome_is_its_own_record_once_even_across_a_restart(tmp_path):
    joiner, tracker, store = make(tmp_path)
    d, o = decision("a"), observation("a")
    feed(joiner, tracker, d, (D, 0, 0))
    (joined,) = feed(joiner, tracker, o, (O, 0, 0))
    store.append([joined.record])
    said = OutcomeReported(request_id="a", correct_route=False, expected_route="deep",
                           labels=("the caller's own words",), source="thumbs")
    (out,) = feed(joiner, tracker, said, ("outcomes", 0, 0))
    record = out.record
    assert (record.join, record.primary) == ("outcome", False)
    assert record.amends == min(str(d.event_id), str(o.event_id)), "the request's record"
    assert (record.outcome.correct_route, record.outcome.expected_route) == (False, "deep")
    assert record.event_ids == (str(said.event_id),)
    assert b"the caller's own words" not in msgspec.json.encode(record), "metadata only"
    store.append([record])
    assert feed(joiner, tracker, said, ("outcomes", 0, 0)) == [], "redelivered"
    assert verify(tmp_path) == (2, [])
    store.append([record])
    (_, problems) = verify(tmp_path)
    assert [p.message for p in problems] == [
        f"event {said.event_id} already recorded at {tmp_path / record.day}.jsonl:2"]
    # A restart rebuilds the index from the files: still once.
    reopened = AuditStore(tmp_path)
    reopened.load_index({0})
    again = Joiner(reopened, OffsetTracker(), 10.0)
    assert again.add(said, ("outcomes", 0, 0), 0.0) == []
    # An outcome for a request the trail has not seen yet is written too, amending nothing.
    (lonely,) = feed(joiner, tracker, OutcomeReported(request_id="b", completed=True),
                     ("outcomes", 0, 1))
    assert (lonely.record.join, lonely.record.amends) == ("outcome", None)
