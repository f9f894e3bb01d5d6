"""The reading side of the deletion log: following the change feed from a cursor, the
folded requests with their sample and owner indexes, and snapshots (a mixin of
:class:`~ray_unlearn.platform.core.deletion_log.DeletionLog`, which supplies the storage, the
per-request file reads and the lock; see deletion_feed.py for the feed's guarantees)."""

from __future__ import annotations

import gc
import logging
import operator
import time
from collections.abc import Iterable
from contextlib import contextmanager

from ray_unlearn.platform.core import deletion_feed as feed
from ray_unlearn.platform.core.deletion_records import (
    UNFINISHED,
    DeletionRequest,
    Event,
    RequestRecord,
    RequestState,
    clone,
    clone_request,
    fold,
)
from ray_unlearn.platform.core.storage import StorageError

log = logging.getLogger("ray_unlearn.platform.core.deletion_log")

# A snapshot is written by a poll once the records applied since the last one reach
# max(SNAPSHOT_MIN_TAIL, requests / SNAPSHOT_TAIL_DIVISOR): writing one costs O(requests), so
# this keeps its cost per record constant while the cold reader's tail stays a small fraction.
SNAPSHOT_MIN_TAIL = 2000
SNAPSHOT_TAIL_DIVISOR = 20


class FeedReader:
    """Queries over every request, each costing the changes since the previous one."""

    def _reset_state(self) -> None:
        self._cursor_ns: int | None = None  # start of the last poll
        self._marks_seen: dict[str, int] = {}  # marker -> its ns, within the lookback only
        self._requests: dict[str, DeletionRequest] = {}
        self._events: dict[str, dict[str, Event]] = {}  # request id -> event name -> event
        self._raw_events: dict[str, list] = {}  # a snapshot's events, not parsed yet
        self._folded: dict[str, RequestRecord] = {}
        self._states: dict[str, RequestState] = {}
        self._unfinished: set[str] = set()
        self._by_sample: dict[int, list[str]] = {}  # sample id -> ids of requests naming it
        self._by_owner: dict[str, list[str]] = {}
        self._deleted: set[int] = set()
        self._orphans: dict[str, dict[str, Event]] = {}  # events whose request is unknown
        self._tail = 0  # records applied since the snapshot this state started from

    # -- following the feed ----------------------------------------------------------
    def poll(self) -> int:
        """Apply the records added since the last poll (a cold instance first loads the newest
        snapshot); returns how many were applied. Every query over all requests calls it."""
        with self._lock:
            self._ensure_migrated()
            started = time.time_ns()
            if self._cursor_ns is None:
                with _gc_paused():
                    self._cold_start()
            lo = self._cursor_ns - feed.LOOKBACK_NS
            applied = 0
            for name in feed.list_markers(self.storage, self.layout, lo, started + feed.SKEW_NS):
                if name in self._marks_seen:
                    continue
                parsed = feed.parse_marker(name)
                if parsed is None:
                    if not name.startswith(".tmp-"):
                        log.warning("deletion log: unexpected file %r in the feed skipped", name)
                    continue
                mns, rid, record = parsed
                if self._apply(rid, record):
                    applied += 1
                elif mns >= self._cursor_ns - feed.LOOKBACK_NS:
                    continue  # its record may still be on its way: look again next poll
                self._marks_seen[name] = mns
            self._cursor_ns = started
            floor = started - 2 * feed.LOOKBACK_NS - feed.BUCKET_NS
            self._marks_seen = {n: t for n, t in self._marks_seen.items() if t >= floor}
            self._tail += applied
            # Only the executor (an instance that moves requests along) snapshots: a gateway
            # replica's poll must stay O(changes), and one writer of snapshots is enough.
            every = self.snapshot_every
            if (
                every is not None
                and self._executes
                and self._tail >= max(every, len(self._requests) // SNAPSHOT_TAIL_DIVISOR)
            ):
                self.snapshot()
            return applied

    def _apply(self, rid: str, record: str) -> bool:
        """Read one record named by a marker into the state; False if it is not there."""
        if record == feed.REQUEST_FILE:
            if rid in self._requests:
                return True  # a retry's marker, or the migration's
            try:
                req = self._read_request(rid)
            except StorageError:
                return False
            except (ValueError, KeyError, TypeError) as e:
                log.warning("deletion log: unreadable request file of %r skipped: %s", rid, e)
                return True
            self._add_request(req)
            orphans = self._orphans.pop(rid, {})
            self._evs(rid).update(orphans)
            self._refold(rid)
            return True
        if record in self._evs(rid):
            return True
        ev = self._read_event(rid, record)
        if ev is None:
            return self.storage.exists(f"{self._dir(rid)}/{record}")  # torn: done with it
        if rid not in self._requests:
            self._orphans.setdefault(rid, {})[record] = ev
            log.warning("deletion log: event %s for unknown request %r held back", record, rid)
            return True
        self._evs(rid)[record] = ev
        self._refold(rid)
        return True

    def _evs(self, rid: str) -> dict[str, Event]:
        """The events of ``rid`` (a snapshot's parsed now, on first use)."""
        raw = self._raw_events.pop(rid, None)
        evs = self._events.setdefault(rid, {})
        for n, ns, st, at, details in raw or ():
            evs.setdefault(n, Event(n, ns, rid, RequestState(st), at, details))
        return evs

    def _add_request(self, req: DeletionRequest) -> None:
        rid = req.request_id
        self._requests[rid] = req
        for s in req.sample_ids:
            self._by_sample.setdefault(s, []).append(rid)
        if req.owner_id is not None:
            self._by_owner.setdefault(req.owner_id, []).append(rid)

    def _refold(self, rid: str) -> None:
        rec, _ = fold(self._requests[rid], self._evs(rid).values())
        self._folded[rid] = rec
        self._states[rid] = rec.state
        if rec.state in UNFINISHED:
            self._unfinished.add(rid)
        else:
            self._unfinished.discard(rid)
        if rec.state is RequestState.DONE:
            self._deleted.update(rec.request.sample_ids)

    # -- snapshots -------------------------------------------------------------------
    def snapshot(self) -> str:
        """Write a compacted snapshot of the state read so far (see deletion_feed.py);
        returns its file name."""
        with self._lock:
            if self._cursor_ns is None:
                self.poll()
            owners = {o: list(r) for o, r in self._by_owner.items()}
            doc = {
                "format": feed.SNAPSHOT_FORMAT,
                "taken_at_ns": self._cursor_ns,
                "requests": [
                    [
                        req.to_json(),
                        self._states[rid].value,
                        self._raw_events.get(rid)
                        or [
                            [e.name, e.ns, e.state.value, e.at, e.details]
                            for e in self._events.get(rid, {}).values()
                        ],
                    ]
                    for rid, req in self._requests.items()
                ],
                "deleted": sorted(self._deleted),
                "owners": owners,
            }
            with _gc_paused():
                name = feed.write_snapshot(self.storage, self.layout, doc)
            self._tail = 0
            return name

    def _cold_start(self) -> None:
        doc = feed.read_newest_snapshot(self.storage, self.layout)
        if doc is None:
            first = feed.first_marker_ns(self.storage, self.layout)
            self._cursor_ns = time.time_ns() if first is None else first + feed.LOOKBACK_NS
            return
        for req_json, state, events in doc["requests"]:
            # Written by this class from validated records: taken as they are (validating
            # 100k requests again would be most of a cold read), events parsed on first use.
            rid = req_json["request_id"]
            req = DeletionRequest(
                rid,
                req_json["sample_ids"],
                req_json["owner_id"],
                req_json["received_at"],
                req_json["deadline"],
            )
            self._requests[rid] = req
            if events:
                self._raw_events[rid] = events
            for s in req.sample_ids:
                self._by_sample.setdefault(s, []).append(rid)
            # The stored state and indexes are used as they are: no fold of the whole log.
            st = self._states[rid] = RequestState(state)
            if st in UNFINISHED:
                self._unfinished.add(rid)
        self._folded = _LazyFolds(self)
        self._by_owner = {o: list(r) for o, r in doc["owners"].items()}
        self._deleted = set(doc["deleted"])
        self._cursor_ns = int(doc["taken_at_ns"])

    # -- queries over every request ------------------------------------------------------
    def records(self) -> list[RequestRecord]:
        """Every readable request, ordered by received_at then id."""
        self.poll()
        with self._lock:
            return _ordered(self._folded[rid] for rid in self._requests)

    def unfinished(self) -> list[RequestRecord]:
        """Requests still owed an execution: pending, executing (maybe orphaned by a crash)
        or failed. Costs the changes since the last call plus the unfinished ones."""
        self.poll()
        with self._lock:
            return _ordered(self._folded[rid] for rid in self._unfinished)

    def deleted_sample_ids(self) -> set[int]:
        """Samples whose deletion is done (a copy of the stored index)."""
        self.poll()
        with self._lock:
            return set(self._deleted)

    def requested_sample_ids(self) -> set[int]:
        """Samples named by any logged request, whatever its state (pending, executing, done
        or failed): everything that must not be used any more."""
        self.poll()
        with self._lock:
            return set(self._by_sample)

    def is_deleted(self, sample_id: int) -> bool:
        """Is the deletion of ``sample_id`` done? O(1) after the poll."""
        self.poll()
        return operator.index(sample_id) in self._deleted

    def is_requested(self, sample_id: int) -> bool:
        """Does any logged request name ``sample_id``? O(1) after the poll."""
        self.poll()
        return operator.index(sample_id) in self._by_sample

    def requests_for_sample(self, sample_id: int) -> list[RequestRecord]:
        """Every request naming ``sample_id`` (audit), from the sample index."""
        sid = operator.index(sample_id)
        self.poll()
        with self._lock:
            return _ordered(self._folded[r] for r in self._by_sample.get(sid, []))

    def deleted_among(self, sample_ids: Iterable[int]) -> set[int]:
        """Those of ``sample_ids`` whose deletion is done: one poll, O(1) per id."""
        self.poll()
        with self._lock:
            return {int(s) for s in sample_ids if int(s) in self._deleted}

    def requests_for_samples(self, sample_ids: Iterable[int]) -> list[RequestRecord]:
        """Every request naming any of ``sample_ids``, each once: one poll, O(1) per id."""
        self.poll()
        with self._lock:
            rids = {r for s in sample_ids for r in self._by_sample.get(int(s), [])}
            return _ordered(self._folded[r] for r in rids)

    def requests_for_owner(self, owner_id: str) -> list[RequestRecord]:
        """Every request made for ``owner_id`` (audit), from the owner index."""
        self.poll()
        with self._lock:
            return _ordered(self._folded[r] for r in self._by_owner.get(owner_id, []))

    def count(self) -> int:
        """How many requests the log holds."""
        self.poll()
        return len(self._requests)


class _LazyFolds(dict):
    """Folded records of a log loaded from a snapshot, folded on first use: a cold reader
    that asks about a few requests never folds them all."""

    def __init__(self, dlog: FeedReader):
        super().__init__()
        self._dlog = dlog

    def __missing__(self, rid: str) -> RequestRecord:
        rec, _ = fold(self._dlog._requests[rid], self._dlog._evs(rid).values())
        self[rid] = rec
        return rec


def _ordered(recs: Iterable[RequestRecord]) -> list[RequestRecord]:
    """Copies, ordered by received_at then id (every query's order)."""
    with _gc_paused():
        out = [_copy(r) for r in recs]
        return sorted(out, key=lambda r: (r.request.received_at, r.request_id))


def _copy(rec: RequestRecord) -> RequestRecord:
    """A copy a caller may change without changing what the next caller gets."""
    return RequestRecord(clone_request(rec.request), rec.state, clone(rec.history))


@contextmanager
def _gc_paused():
    """Bulk loads and copies allocate millions of small objects; Python's cyclic collector
    would rescan every live one many times over (seen: half of a cold read of 3,000
    requests). Nothing made here is cyclic, so it is paused for the duration."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
