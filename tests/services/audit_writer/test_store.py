import gzip
import json
import logging
import os
import time
from datetime import date, timedelta

from routemesh.services.audit_writer.records import build_record
from routemesh.services.audit_writer.reports import newest_files, summarize, verify
from routemesh.services.audit_writer.store import AuditStore, list_files, read_lines
from tests.services.audit_writer.helpers import DAY, decision, observation


def records(n, day=DAY, prefix="r"):
    """Records of events received when they happened."""
    return [build_record("joined", f"{prefix}{i}", decision(f"{prefix}{i}", day),
                         observation(f"{prefix}{i}", day), now=day) for i in range(n)]


def test_append_fsyncs_each_touched_file_once_per_batch_unless_off(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def slow_fsync(fd):
        synced.append(fd)
        real_fsync(fd)
        time.sleep(0.02)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    two_days = records(3) + records(2, day=DAY - timedelta(days=1), prefix="y")
    write_s, fsync_s = AuditStore(tmp_path).append(two_days)
    assert len(synced) == 2
    assert fsync_s >= 0.04, "the fsync time is the fsyncs'"
    assert write_s < fsync_s, "and not counted as writing"
    synced.clear()
    AuditStore(tmp_path / "nosync", fsync="off").append(records(3))
    assert synced == []


def test_appends_rotate_by_size_within_a_day(tmp_path):
    store = AuditStore(tmp_path, max_file_bytes=4000)
    for batch in range(6):
        store.append(records(3, prefix=f"b{batch}-"))
    store.close()
    names = [f.path.name for f in list_files(tmp_path)]
    assert names[0] == "2026-11-23.jsonl"
    assert names[1:3] == ["2026-11-23.1.jsonl", "2026-11-23.2.jsonl"]
    lines = sum(1 for f in list_files(tmp_path) for _ in f.path.open())
    assert lines == 18


def test_the_index_survives_a_restart_and_a_torn_line(tmp_path):
    store = AuditStore(tmp_path)
    store.append(records(5))
    store.close()
    with (tmp_path / "2026-11-23.jsonl").open("ab") as handle:
        handle.write(b'{"request_id": "torn", "jo')
    reopened = AuditStore(tmp_path)
    assert reopened.load_index({0}) == 5
    assert reopened.state("r3").has_observation
    assert reopened.state("torn") is None


def test_an_append_after_a_torn_line_starts_a_fresh_line(tmp_path):
    store = AuditStore(tmp_path)
    store.append(records(2))
    store.close()
    with (tmp_path / "2026-11-23.jsonl").open("ab") as handle:
        handle.write(b'{"request_id": "torn", "jo')
    reopened = AuditStore(tmp_path)
    reopened.append(records(1, prefix="after"))
    reopened.close()
    lines = (tmp_path / "2026-11-23.jsonl").read_bytes().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["r0", "r1", "after0"]
    assert verify(tmp_path) == (3, [])


def test_the_index_is_bounded_and_keeps_the_newest(tmp_path):
    store = AuditStore(tmp_path, dedup_capacity=1000)
    for record in records(1500):
        store.mark(record)
    assert store.state("r0") is None
    assert store.state("r1499").has_decision


def test_maintenance_gzips_past_days_and_applies_retention(tmp_path, caplog):
    caplog.set_level(logging.INFO, "routemesh.services.audit_writer.store")
    store = AuditStore(tmp_path)
    today = date(2026, 11, 23)
    for back in (40, 3, 1, 0):
        when = DAY - timedelta(days=back)
        store.append(records(20, day=when, prefix=f"d{back}-"))
    compressed, deleted = store.maintain(today, retention_days=30, retention_bytes=10**9)
    assert sorted(p.name for p in compressed) == ["2026-11-20.jsonl.gz", "2026-11-22.jsonl.gz"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "2026-11-23.jsonl" in names, "today's open file is left alone"
    assert "2026-11-22.jsonl.gz" in names
    assert "2026-11-20.jsonl.gz" in names
    assert not any(n.startswith("2026-10-14") for n in names), "older than 30 days"
    assert len(deleted) == 1
    (logged,) = [r for r in caplog.records if r.getMessage().startswith("retention deleted")]
    assert (logged.file, logged.reason) == ("2026-10-14.jsonl", "age"), "each file named"
    with gzip.open(tmp_path / "2026-11-22.jsonl.gz") as handle:
        assert sum(1 for _ in handle) == 20
    store.append(records(1, prefix="after-"))
    _, deleted = store.maintain(today, retention_days=30, retention_bytes=1)
    assert (tmp_path / "2026-11-23.jsonl").exists(), "never deletes the open file"
    assert all(not p.name.endswith(".gz") for p in tmp_path.iterdir())


def test_a_late_record_for_a_compressed_day_goes_to_a_new_part(tmp_path):
    store = AuditStore(tmp_path)
    yesterday = DAY - timedelta(days=1)
    store.append(records(2, day=yesterday))
    store.maintain(date(2026, 11, 23), retention_days=30, retention_bytes=10**9)
    store.append(records(1, day=yesterday, prefix="late-"))
    names = sorted(f.path.name for f in list_files(tmp_path))
    assert names == ["2026-11-22.1.jsonl", "2026-11-22.jsonl.gz"]


def test_summary_reads_plain_and_gzip_files(tmp_path):
    store = AuditStore(tmp_path)
    store.append(records(10, day=DAY - timedelta(hours=30), prefix="old-"))
    store.append(records(4, day=DAY - timedelta(minutes=5), prefix="new-"))
    failing = build_record("joined", "err", decision("err", DAY - timedelta(minutes=1)),
                           observation("err", DAY - timedelta(minutes=1), upstream_status=502,
                                       error_class="UpstreamError"), now=DAY)
    store.append([failing])
    store.maintain(date(2026, 11, 23), retention_days=30, retention_bytes=10**9)
    store.close()
    windows = {"15m": timedelta(minutes=15), "48h": timedelta(hours=48)}
    report = summarize(tmp_path, windows, None, DAY + timedelta(seconds=1))
    result = report.windows
    assert report.anchored_at == DAY + timedelta(seconds=1)
    assert result["15m"].requests == 5
    assert result["48h"].requests == 15
    assert result["15m"].non_2xx_rate == 0.2
    assert result["15m"].error_rate == 0.2
    assert result["15m"].route_share == {"lite": 1.0}
    assert result["48h"].tokens["total_tokens"] == 450
    assert result["15m"].decision_latency_ms.p50 == 4.0


def test_the_summary_ends_at_the_newest_record_so_an_archive_reads_the_same_any_day(tmp_path):
    store = AuditStore(tmp_path)
    store.append(records(3, day=DAY - timedelta(hours=30), prefix="old-"))
    store.append(records(2, day=DAY - timedelta(minutes=10), prefix="a-"))
    store.append(records(1, day=DAY, prefix="newest-"))
    store.close()
    windows = {"15m": timedelta(minutes=15), "48h": timedelta(hours=48)}
    report = summarize(tmp_path, windows, None)
    assert report.anchored_at == DAY
    assert (report.windows["15m"].requests, report.windows["48h"].requests) == (3, 6)
    earlier = summarize(tmp_path, windows, None, DAY - timedelta(hours=29))
    assert (earlier.windows["15m"].requests, earlier.windows["48h"].requests) == (0, 3), (
        "records after the anchor are not counted")
    newest_file_only = summarize(tmp_path, windows, None, max_files=1)
    assert newest_file_only.files_read == 1
    assert newest_file_only.windows["48h"].requests == 3
    assert summarize(tmp_path / "empty", windows, None).anchored_at is None


def test_verify_names_the_file_and_line_of_each_problem(tmp_path):
    store = AuditStore(tmp_path)
    store.append(records(3))
    store.close()
    assert verify(tmp_path) == (3, [])
    path = tmp_path / "2026-11-23.jsonl"
    lines = path.read_text().splitlines()
    duplicate = lines[1]
    leaky = json.loads(lines[0])
    leaky["decision"]["prompt_text"] = "oops"
    path.write_text("\n".join([*lines, duplicate, json.dumps(leaky), "not json"]) + "\n")
    checked, problems = verify(tmp_path)
    assert checked == 6
    assert [p.line for p in problems] == [4, 5, 6]
    assert "already recorded at" in problems[0].message
    assert "unknown field `prompt_text`" in problems[1].message


def test_readers_survive_files_being_compressed_or_deleted_under_them(tmp_path):
    store = AuditStore(tmp_path)
    store.append(records(3, day=DAY - timedelta(days=1), prefix="y"))
    store.close()
    (listed,) = list_files(tmp_path)
    plain = listed.path
    # Mid-compression: both the plain file and its complete .gz exist; read once.
    with plain.open("rb") as source, gzip.open(plain.with_name(plain.name + ".gz"), "wb") as gz:
        gz.write(source.read())
    assert [f.compressed for f in list_files(tmp_path)] == [False]
    assert verify(tmp_path) == (3, [])
    # The plain file goes after the listing: its .gz is read instead.
    plain.unlink()
    assert len(list(read_lines(listed))) == 3
    # Retention deletes it after the listing: nothing to read, no error.
    plain.with_name(plain.name + ".gz").unlink()
    assert list(read_lines(listed)) == []


def test_a_torn_line_left_by_a_crash_is_not_archived(tmp_path):
    store = AuditStore(tmp_path)
    store.append(records(2, day=DAY - timedelta(days=1), prefix="y"))
    store.close()
    (file,) = list_files(tmp_path)
    with file.path.open("ab") as handle:
        handle.write(b'{"request_id": "torn", "jo')
    compressed, _ = AuditStore(tmp_path).maintain(
        date(2026, 11, 23), retention_days=30, retention_bytes=10**9)
    assert [p.name for p in compressed] == ["2026-11-22.jsonl.gz"]
    assert verify(tmp_path) == (2, [])


def test_the_newest_files_are_counted_per_partition(tmp_path):
    """Bounded reading still sees every partition's newest records: a cut of the newest
    files overall would read some partitions of a day and not others."""
    store = AuditStore(tmp_path)
    for back in (2, 1, 0):
        for partition in range(3):
            store.append(records(1, day=DAY - timedelta(days=back), prefix=f"{back}{partition}-"),
                         partition)
    store.close()
    newest = newest_files(list_files(tmp_path), 1)
    assert [(f.day, f.partition) for f in newest] == [("2026-11-23", p) for p in range(3)]
    assert len(newest_files(list_files(tmp_path), None)) == 9
    assert summarize(tmp_path, {"1h": timedelta(hours=1)}, None, max_files=1).files_read == 3
