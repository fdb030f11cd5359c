"""The scorer's ledger of one input partition as changelog records (runtime
``Changelog``): an hour's bucket, a pending request, a review candidate, each under its
own key, and the mark with the offsets they cover and the ledger's counters."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import msgspec

from routemesh.contracts import ReviewCandidate
from routemesh.services.runtime.changelog import MARK, Restored
from routemesh.services.runtime.state import Covered
from routemesh.services.scorer.ledger import (
    OTHER,
    Bucket,
    Changes,
    Counts,
    Entry,
    Ledger,
    Limits,
    candidate_time,
)

_BUCKET, _PENDING, _CANDIDATE = b"b:", b"p:", b"c:"
_encode = msgspec.msgpack.encode


class Mark(Covered, kw_only=True):
    counts: Counts = msgspec.field(default_factory=Counts)


def changes(ledger: Ledger, changed: Changes) -> dict[bytes, bytes | None]:
    """The records that bring a partition's changelog to ``ledger``."""
    found: dict[bytes, bytes | None] = {}
    for hour in changed.hours:
        bucket = ledger.buckets.get(hour)
        found[_BUCKET + str(hour).encode()] = None if bucket is None else _encode(bucket)
    for request_id in changed.requests:
        entry = ledger.pending.get(request_id)
        found[_PENDING + request_id.encode()] = None if entry is None else _encode(entry)
    for request_id in changed.candidates:
        candidate = ledger.candidates.get(request_id)
        found[_CANDIDATE + request_id.encode()] = (
            None if candidate is None else _encode(candidate))
    return found


def mark(ledger: Ledger, offsets: dict[str, int], anchors: dict[str, str]) -> bytes:
    return _encode(Mark(offsets=offsets, anchors=anchors, counts=ledger.counts()))


def apply(ledger: Ledger, key: bytes, value: bytes | None, *, joins: bool = True) -> None:
    """One record into ``ledger``; without ``joins`` pending requests are skipped
    unread (a ledger kept only for its figures)."""
    if key.startswith(_PENDING):
        if joins:
            request_id = key[len(_PENDING):].decode()
            if value is None:
                ledger.pending.pop(request_id, None)
            else:
                ledger.pending[request_id] = msgspec.msgpack.decode(value, type=Entry)
    elif key.startswith(_BUCKET):
        hour = int(key[len(_BUCKET):])
        if value is None:
            ledger.buckets.pop(hour, None)
        else:
            bucket = ledger.buckets[hour] = msgspec.msgpack.decode(value, type=Bucket)
            ledger.known_routes |= set(bucket.routes) - {OTHER}
    elif key.startswith(_CANDIDATE):
        request_id = key[len(_CANDIDATE):].decode()
        if value is None:
            ledger.candidates.pop(request_id, None)
        else:
            ledger.candidates[request_id] = msgspec.msgpack.decode(value, type=ReviewCandidate)
    elif key == MARK and value is not None:
        ledger.take_counts(msgspec.msgpack.decode(value, type=Mark).counts)


def restore(restored: Restored, limits: Limits) -> tuple[Ledger, Mark]:
    """A partition's ledger and its mark (empty when nothing was saved). Keys a cut
    write left behind are marked changed, so the next save supersedes them."""
    ledger = Ledger(limits)
    for key, value in restored.values.items():
        apply(ledger, key, value)
    # Compaction keeps a key where it was last written: the horizon counts from seen.
    ledger.pending = OrderedDict(sorted(ledger.pending.items(), key=lambda kv: kv[1].seen))
    ledger.candidates = OrderedDict(sorted(
        ledger.candidates.items(), key=lambda kv: candidate_time(kv[1])))
    found = Mark()
    if restored.mark is not None:
        found = msgspec.msgpack.decode(restored.mark, type=Mark)
        ledger.take_counts(found.counts)
    ledger.changes = torn(restored.torn)
    return ledger, found


def torn(keys: Iterable[bytes]) -> Changes:
    found = Changes()
    for key in keys:
        if key.startswith(_BUCKET):
            found.hours.add(int(key[len(_BUCKET):]))
        elif key.startswith(_PENDING):
            found.requests.add(key[len(_PENDING):].decode())
        elif key.startswith(_CANDIDATE):
            found.candidates.add(key[len(_CANDIDATE):].decode())
    return found
