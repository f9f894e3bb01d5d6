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

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from ray_unlearn.platform.core import deletion_feed as feed
from ray_unlearn.platform.core.deletion_reader import SNAPSHOT_MIN_TAIL, FeedReader
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


class DeletionLog(FeedReader):
    """The deletion log of one run under one storage root (see the module docstring).

    One instance keeps the state it has read (a cursor into the feed and the folded requests
    with their indexes), so keep one per process and ask it again: each query then costs the
    changes since the last one. Thread-safe."""

    def __init__(
        self, storage: Storage, layout: RunLayout, *, snapshot_every: int | None = SNAPSHOT_MIN_TAIL
    ):
        self.storage = storage
        self.layout = layout
        # None: never writes snapshots; else its polls do, once it has written a transition
        self.snapshot_every = snapshot_every
        self._executes = False
        self._last_ns = 0  # keeps this process's event names strictly increasing
        self._lock = threading.RLock()
        self._loaded = False
        # Parsed files by path: every file of the log is created whole and never changed.
        self._files_seen: dict[str, Any] = {}
        self._reset_state()

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
        self._executes = True
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
