"""The deletion request log: append-only, durable before acknowledgement, idempotent by id,
and read at a cost that follows the changes, not the size of the log.

Why one object per record: a local disk can append to a file, an object store cannot, and a
log that rewrote one growing file would risk losing acknowledged requests to a torn write.
So every fact is its own small JSON file, written once and never changed, under its
request's own prefix::

    deletions/r/<request_id>/request.json                the request (created exclusively)
    deletions/r/<request_id>/<ns:020d>-<uuid8>.json      one state transition of it

plus a change feed, snapshots and (for logs of the first layout) a migration marker, see
platform/core/deletion_feed.py. A request's state is its events folded in name (= time)
order; :meth:`DeletionLog.get` and :meth:`DeletionLog.transition` list only that request's
prefix. Queries over all requests (:meth:`records`, :meth:`unfinished`, the sample and owner
indexes) follow the feed from a cursor: each call reads only the records added since the
previous one, and a cold reader starts from the newest snapshot.

A request is acknowledged when :meth:`submit` returns: its marker and then its file are
durable (:meth:`Storage.write_bytes` fsyncs the file and its folder on a local disk; a PUT on
an object store is durable when it returns). Same for a transition. Reading is tolerant: a
crash can leave temp files (``.tmp-*``), a marker whose record never came, or torn files;
they are skipped (torn or foreign ones with a logged warning), and an invalid transition found
while folding (two writers racing on one request) is skipped the same way, so every reader
folds to the same state. Transitions are check-then-append: the caller that owns a request
(the executor) serialises its transitions.
"""

from __future__ import annotations

import gc
import json
import logging
import operator
import threading
import time
import uuid
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

from ray_unlearn.platform.core import deletion_feed as feed
from ray_unlearn.platform.core.deletion_records import (
    ALLOWED_TRANSITIONS,
    REQUEST_ID_RE,
    UNFINISHED,
    DeletionLogError,
    DeletionRequest,
    Event,
    RequestRecord,
    RequestState,
    check_request_id,
    check_time,
    check_transition,
    clone,
    clone_request,
    fold,
    initial_entry,
    normalise_sample_ids,
    parse_event,
    parse_request,
)
from ray_unlearn.platform.core.storage import AlreadyExists, RunLayout, Storage, StorageError

__all__ = [
    "ALLOWED_TRANSITIONS",
    "REQUEST_ID_RE",
    "UNFINISHED",
    "DeletionLog",
    "DeletionLogError",
    "DeletionRequest",
    "RequestRecord",
    "RequestState",
]

log = logging.getLogger(__name__)

# A snapshot is written by a poll once the records applied since the last one reach
# max(SNAPSHOT_MIN_TAIL, requests / SNAPSHOT_TAIL_DIVISOR): writing one costs O(requests), so
# this keeps its cost per record constant while the cold reader's tail stays a small fraction.
SNAPSHOT_MIN_TAIL = 2000
SNAPSHOT_TAIL_DIVISOR = 20


class DeletionLog:
    """The deletion log of one run under one storage root (see the module docstring).

    One instance keeps the state it has read (a cursor into the feed and the folded requests
    with their indexes), so keep one per process and ask it again: each query then costs the
    changes since the last one. Thread-safe."""

    def __init__(
        self, storage: Storage, layout: RunLayout, *, snapshot_every: int | None = SNAPSHOT_MIN_TAIL
    ):
        self.storage = storage
        self.layout = layout
        self.snapshot_every = snapshot_every  # None: this reader never writes snapshots
        self._last_ns = 0  # keeps this process's event names strictly increasing
        self._lock = threading.RLock()
        self._loaded = False
        # Parsed files by path: every file of the log is created whole and never changed.
        self._files_seen: dict[str, Any] = {}
        self._reset_state()

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

    def __repr__(self) -> str:
        return f"DeletionLog({self.storage.uri!r}, run={self.layout.run_id!r})"

    def _dir(self, request_id: str) -> str:
        return self.layout.deletion_request_dir(request_id)

    # -- writing ---------------------------------------------------------------------
    def _write_record(self, request_id: str, record: str, data: bytes) -> None:
        """Marker first, then the record: a reader that sees the record's marker waits for
        the record (deletion_feed.py); raises AlreadyExists from the record's create."""
        self._ensure_migrated()
        ns = feed.write_marker(self.storage, self.layout, request_id, record)
        self.storage.write_bytes(f"{self._dir(request_id)}/{record}", data, exclusive=True)
        feed.remark_if_late(self.storage, self.layout, request_id, record, ns)

    def submit(
        self,
        sample_ids: Iterable[int],
        *,
        owner_id: str | None = None,
        request_id: str | None = None,
        deadline: float | None = None,
        received_at: float | None = None,
    ) -> tuple[RequestRecord, bool]:
        """Record a request; when this returns it is durable (the acknowledgement point).

        Returns ``(record, created)``. Resubmitting an id with the same owner and samples is
        a no-op returning the stored record (``created`` False), so clients can retry after
        a lost reply; the same id with other content is an error. Input is validated before
        anything is written.
        """
        request_id = check_request_id(
            f"req-{uuid.uuid4().hex[:12]}" if request_id is None else request_id
        )
        ids = normalise_sample_ids(sample_ids)
        if owner_id is not None and not isinstance(owner_id, str):
            raise DeletionLogError(f"owner_id must be a string or None, got {owner_id!r}")
        received = check_time("received_at", time.time() if received_at is None else received_at)
        if deadline is not None:
            deadline = check_time("deadline", deadline)
            if deadline <= received:
                raise DeletionLogError(f"deadline {deadline} is not after received_at {received}")
        req = DeletionRequest(request_id, ids, owner_id, received, deadline)
        data = json.dumps(req.to_json(), sort_keys=True).encode()
        try:
            # Known ids go straight to the comparison: a refused resubmission writes nothing.
            if self.storage.exists(f"{self._dir(request_id)}/{feed.REQUEST_FILE}"):
                raise AlreadyExists(request_id)
            self._write_record(request_id, feed.REQUEST_FILE, data)
        except AlreadyExists:
            existing = self.get(request_id)
            if existing.request.owner_id != owner_id or existing.request.sample_ids != ids:
                raise DeletionLogError(
                    f"request id {request_id!r} already exists with different content "
                    f"(owner {existing.request.owner_id!r}, "
                    f"{len(existing.request.sample_ids)} samples); resubmitting an id needs "
                    "the same owner_id and sample_ids"
                ) from None
            # The first writer may have died before it could re-mark a late record: a retry
            # marks it again, so readers following the feed see what the retry acknowledges.
            self._ensure_migrated()
            feed.write_marker(self.storage, self.layout, request_id, feed.REQUEST_FILE)
            return existing, False
        return RequestRecord(req, RequestState.PENDING, [initial_entry(req)]), True

    def transition(
        self, request_id: str, state: RequestState | str, /, **details: Any
    ) -> RequestRecord:
        """Move a request to ``state`` and durably record why (``details``: executor,
        versions retired/created, error...). Forbidden moves raise before writing."""
        try:
            new = RequestState(state)
        except ValueError:
            allowed = ", ".join(s.value for s in RequestState)
            raise DeletionLogError(f"unknown state {state!r}; states are: {allowed}") from None
        record, last_ns = self._fold_one(request_id)
        check_transition(request_id, record.state, new)
        try:
            json.dumps(details)
        except (TypeError, ValueError) as e:
            raise DeletionLogError(f"transition details must be JSON-serialisable: {e}") from e
        # Strictly after this request's latest event even if clocks disagree across hosts,
        # so name order is this request's causal order.
        ns = max(time.time_ns(), last_ns + 1, self._last_ns + 1)
        self._last_ns = ns
        at = ns / 1e9
        name = f"{ns:020d}-{uuid.uuid4().hex[:8]}.json"
        body = {"request_id": request_id, "state": new.value, "at": at, "details": details}
        self._write_record(request_id, name, json.dumps(body, sort_keys=True).encode())
        record.state = new
        record.history.append({"state": new.value, "at": at, "details": details})
        return record

    # -- one request -----------------------------------------------------------------
    def get(self, request_id: str) -> RequestRecord:
        """The current record of one request (lists only that request's prefix)."""
        return self._fold_one(request_id)[0]

    def _fold_one(self, request_id: str) -> tuple[RequestRecord, int]:
        check_request_id(request_id)
        self._ensure_migrated()
        folder = self._dir(request_id)
        names = self.storage.listdir(folder)
        if feed.REQUEST_FILE not in names:
            raise DeletionLogError(f"unknown deletion request {request_id!r}")
        try:
            req = self._read_request(request_id)
        except (StorageError, ValueError, KeyError, TypeError) as e:
            raise DeletionLogError(
                f"deletion request {request_id!r} is stored but unreadable "
                f"({folder}/{feed.REQUEST_FILE}): {e}"
            ) from e
        events = []
        for name in names:
            if name == feed.REQUEST_FILE or name.startswith(".tmp-"):
                continue
            if not feed.EVENT_RE.match(name):
                log.warning("deletion log: unexpected file %r in %s skipped", name, folder)
                continue
            ev = self._read_event(request_id, name)
            if ev is not None:
                events.append(ev)
        return fold(req, events)

    def _read_request(self, request_id: str) -> DeletionRequest:
        path = f"{self._dir(request_id)}/{feed.REQUEST_FILE}"
        if path not in self._files_seen:
            self._files_seen[path] = parse_request(self.storage.read_bytes(path), request_id)
        return self._files_seen[path]

    def _read_event(self, request_id: str, name: str) -> Event | None:
        """The parsed event, or None when it is torn (warned) or absent."""
        path = f"{self._dir(request_id)}/{name}"
        if path in self._files_seen:
            return self._files_seen[path]
        m = feed.EVENT_RE.match(name)
        try:
            raw = self.storage.read_bytes(path)
        except StorageError:
            return None
        try:
            ev = parse_event(raw, name, int(m.group(1)), request_id)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("deletion log: unreadable event file %s skipped: %s", path, e)
            return None
        self._files_seen[path] = ev
        return ev

    def _ensure_migrated(self) -> None:
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    feed.migrate_legacy(self.storage, self.layout)
                    self._loaded = True

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
            every = self.snapshot_every
            if every is not None and self._tail >= max(
                every, len(self._requests) // SNAPSHOT_TAIL_DIVISOR
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

    def __init__(self, dlog: DeletionLog):
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
