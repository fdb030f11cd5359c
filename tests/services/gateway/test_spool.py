from routemesh.services.gateway.spool import Spool


def lines_of(spool: Spool) -> list[bytes]:
    return [line for _, line in spool.read(10)[0]]


def test_events_come_back_in_order_and_confirmed_ones_stay_gone(tmp_path):
    spool = Spool(tmp_path)
    spool.append([b"e1", b"e2"])
    spool.append([b"e3"])
    lines, end = spool.read(2)
    assert lines == [(0, b"e1"), (3, b"e2")], "each line with its byte offset"
    spool.confirm(end)
    assert spool.read(10)[0] == [(6, b"e3")]
    spool.close()

    reopened = Spool(tmp_path)
    lines, end = reopened.read(10)
    assert lines == [(6, b"e3")], "the confirmed position survives a restart"
    reopened.confirm(end)
    assert reopened.pending_bytes == 0
    assert (tmp_path / "events.jsonl").stat().st_size == 0, "a drained spool is emptied"


def test_a_torn_last_line_is_not_read(tmp_path):
    spool = Spool(tmp_path)
    spool.append([b"whole"])
    spool._handle.write(b"half-writ")
    spool._handle.flush()
    assert lines_of(spool) == [b"whole"]


def test_prepend_puts_older_events_first(tmp_path):
    spool = Spool(tmp_path)
    spool.append([b"s1", b"s2", b"s3"])
    spool.confirm(spool.read(1)[1])
    spool.prepend([b"q1", b"q2"])
    assert lines_of(spool) == [b"q1", b"q2", b"s2", b"s3"]
    spool.close()
    assert lines_of(Spool(tmp_path)) == [b"q1", b"q2", b"s2", b"s3"]


def test_after_a_crash_mid_write_the_next_event_starts_on_a_fresh_line(tmp_path):
    spool = Spool(tmp_path)
    spool.append([b"whole"])
    spool._handle.write(b"half-writ")
    spool._handle.flush()
    spool._handle.close()  # the process died here
    reopened = Spool(tmp_path)
    reopened.append([b"next-event"])
    # The fragment is kept as a line of its own (for the dead-letter topic, as it is);
    # the event after it reads back intact.
    assert lines_of(reopened) == [b"whole", b"half-writ", b"next-event"]
