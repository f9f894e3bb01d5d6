"""The deletion request log: append-only, durable before acknowledgement, idempotent by id.

Why one object per record: a local disk can append to a file, an object store cannot, and a
log that rewrote one growing file would risk losing acknowledged requests to a torn write.
So every fact is its own small JSON file, written once and never changed::

    deletions/requests/<request_id>.json                       the request (created exclusively)
    deletions/events/<ns:020d>-<request_id>-<uuid8>.json       one state transition

A request is acknowledged when :meth:`DeletionLog.submit` returns, which is after its file
is durable (:meth:`Storage.write_bytes` fsyncs the file and its folder on a local disk; a
PUT on an object store is durable when it returns). A request with no events is pending.
Event names sort by time (fixed-width nanoseconds first) and never collide (a random
suffix), so the state of a request is its events folded in name order. Because the
request id sits between fixed-width parts of the name, a single request's events are
found from one folder listing without reading the others.

Reading is tolerant by design: a crash or a filesystem without atomic rename can leave
temp files (``.tmp-*``) or torn files behind, and an event may name a request that is not
there. Those are skipped (torn or foreign files with a logged warning) so the log always
stays readable; an invalid transition found while folding (two writers racing on one
request) is skipped the same way, so every reader folds to the same state.

Transitions are check-then-append: the caller that owns a request (the executor) is
expected to serialise its transitions. Every read lists the folders again, because another
process (the gateway, another executor) may have appended in the meantime; a file already
parsed by this reader is not read again (files are created whole and never changed), and
every record handed out is a fresh copy.
"""

from __future__ import annotations

import bisect
import copy
import json
import logging
import math
import operator
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ray_unlearn.platform.core.storage import AlreadyExists, RunLayout, Storage, StorageError

log = logging.getLogger(__name__)

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_NS_WIDTH = 20
_SUFFIX_WIDTH = 8
# <20 digits>-<request_id>-<8 hex>.json; the id is recovered by position, not by splitting,
# because ids may themselves contain '-'.
_EVENT_RE = re.compile(r"^(\d{20})-(.+)-([0-9a-f]{8})\.json$")


class DeletionLogError(ValueError):
    """Bad input, an unknown request, a conflicting resubmission or a forbidden transition."""


class RequestState(str, Enum):
    """Where a deletion request stands. A request with no events is pending."""

    PENDING = "pending"
    EXECUTING = "executing"
    DONE = "done"
    FAILED = "failed"


# pending -> done is deliberately absent: a deletion is done only after an execution.
ALLOWED_TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    RequestState.PENDING: frozenset({RequestState.EXECUTING}),
    RequestState.EXECUTING: frozenset(
        {RequestState.DONE, RequestState.FAILED, RequestState.PENDING}  # pending: re-queued
    ),
    RequestState.FAILED: frozenset({RequestState.EXECUTING}),  # retry
    RequestState.DONE: frozenset(),
}
UNFINISHED = frozenset({RequestState.PENDING, RequestState.EXECUTING, RequestState.FAILED})


def _check_transition(request_id: str, current: RequestState, new: RequestState) -> None:
    allowed = ALLOWED_TRANSITIONS[current]
    if new not in allowed:
        names = ", ".join(sorted(s.value for s in allowed)) or "none (final state)"
        raise DeletionLogError(
            f"request {request_id!r}: transition {current.value} -> {new.value} is not "
            f"allowed; from {current.value} the allowed states are: {names}"
        )


def _check_request_id(request_id: Any) -> str:
    if not isinstance(request_id, str) or not REQUEST_ID_RE.match(request_id):
        raise DeletionLogError(
            f"bad request id {request_id!r}: it must match {REQUEST_ID_RE.pattern} "
            "(letters, digits, '.', '_', '-'; at most 128 characters; it names a file)"
        )
    return request_id


def _normalise_sample_ids(sample_ids: Any) -> list[int]:
    """Sorted unique Python ints; numpy integers are accepted, bools and strings are not."""
    if isinstance(sample_ids, str | bytes) or not isinstance(sample_ids, Iterable):
        raise DeletionLogError(f"sample_ids must be a collection of ints, got {sample_ids!r}")
    out: set[int] = set()
    for s in sample_ids:
        if isinstance(s, bool):
            raise DeletionLogError(f"sample id {s!r} is a bool, not an int")
        try:
            v = operator.index(s)
        except TypeError:
            raise DeletionLogError(f"sample id {s!r} is not an int") from None
        if not _INT64_MIN <= v <= _INT64_MAX:
            raise DeletionLogError(f"sample id {v} does not fit in int64")
        out.add(v)
    if not out:
        raise DeletionLogError("a deletion request needs at least one sample id")
    return sorted(out)


def _check_time(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DeletionLogError(f"{name} must be a finite unix time in seconds, got {value!r}")
    return float(value)


@dataclass
class DeletionRequest:
    """What was asked, and when: immutable once written."""

    request_id: str
    sample_ids: list[int]
    owner_id: str | None = None
    received_at: float = 0.0
    deadline: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "sample_ids": list(self.sample_ids),
            "owner_id": self.owner_id,
            "received_at": self.received_at,
            "deadline": self.deadline,
        }

    @classmethod
    def from_json(cls, obj: Any) -> DeletionRequest:
        """Strict: stored files are validated like input, so a damaged file is rejected."""
        if not isinstance(obj, dict):
            raise DeletionLogError(f"a request record must be an object, got {type(obj).__name__}")
        owner = obj.get("owner_id")
        if owner is not None and not isinstance(owner, str):
            raise DeletionLogError(f"owner_id must be a string or null, got {owner!r}")
        deadline = obj.get("deadline")
        return cls(
            request_id=_check_request_id(obj["request_id"]),
            sample_ids=_normalise_sample_ids(obj["sample_ids"]),
            owner_id=owner,
            received_at=_check_time("received_at", obj["received_at"]),
            deadline=None if deadline is None else _check_time("deadline", deadline),
        )


def _last_detail(history: list[dict[str, Any]], key: str) -> Any:
    for h in reversed(history):
        if key in h["details"]:
            return h["details"][key]
    return None


@dataclass
class RequestRecord:
    """A request folded with its events: the current state and the full history.

    ``history`` starts with the implicit ``pending`` at ``received_at`` and then holds one
    ``{state, at, details}`` per applied event, oldest first.
    """

    request: DeletionRequest
    state: RequestState = RequestState.PENDING
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def details(self) -> dict[str, Any]:
        """The details of the latest event ({} for a request never transitioned)."""
        return self.history[-1]["details"] if self.history else {}

    @property
    def executed_by(self) -> str | None:
        """Who executed it: the latest ``executed_by`` any event recorded."""
        return _last_detail(self.history, "executed_by")

    @property
    def versions_retired(self) -> list[str]:
        """Model versions the (latest recorded) execution retired."""
        return list(_last_detail(self.history, "versions_retired") or [])

    @property
    def versions_created(self) -> list[str]:
        """Model versions the (latest recorded) execution published."""
        return list(_last_detail(self.history, "versions_created") or [])

    @property
    def done_at(self) -> float | None:
        if self.state is not RequestState.DONE:
            return None
        return self.history[-1]["at"]

    def to_json(self) -> dict[str, Any]:
        """A JSON view for status and audit endpoints."""
        return {
            **self.request.to_json(),
            "state": self.state.value,
            "history": [dict(h) for h in self.history],
            "executed_by": self.executed_by,
            "versions_retired": self.versions_retired,
            "versions_created": self.versions_created,
            "done_at": self.done_at,
        }


@dataclass(frozen=True)
class _Event:
    name: str
    ns: int
    request_id: str
    state: RequestState
    at: float
    details: dict[str, Any]


class DeletionLog:
    """The deletion log of one run under one storage root (see the module docstring)."""

    def __init__(self, storage: Storage, layout: RunLayout):
        self.storage = storage
        self.layout = layout
        self._last_ns = 0  # keeps this process's event names strictly increasing
        # Parsed files by name. Every file of the log is created whole and exclusively and
        # never changed, so a file read once is known for good: reading the log costs the
        # listings and the files not seen before, not every file on every call.
        self._events_seen: dict[str, _Event] = {}
        self._requests_seen: dict[str, DeletionRequest] = {}

    def __repr__(self) -> str:
        return f"DeletionLog({self.storage.uri!r}, run={self.layout.run_id!r})"

    # -- paths -----------------------------------------------------------------------
    def _request_path(self, request_id: str) -> str:
        return f"{self.layout.deletion_requests}/{request_id}.json"

    def _event_path(self, name: str) -> str:
        return f"{self.layout.deletion_events}/{name}"

    # -- writing ---------------------------------------------------------------------
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
        request_id = _check_request_id(
            f"req-{uuid.uuid4().hex[:12]}" if request_id is None else request_id
        )
        ids = _normalise_sample_ids(sample_ids)
        if owner_id is not None and not isinstance(owner_id, str):
            raise DeletionLogError(f"owner_id must be a string or None, got {owner_id!r}")
        received = _check_time("received_at", time.time() if received_at is None else received_at)
        if deadline is not None:
            deadline = _check_time("deadline", deadline)
            if deadline <= received:
                raise DeletionLogError(f"deadline {deadline} is not after received_at {received}")
        req = DeletionRequest(request_id, ids, owner_id, received, deadline)
        data = json.dumps(req.to_json(), sort_keys=True).encode()
        try:
            self.storage.write_bytes(self._request_path(request_id), data, exclusive=True)
        except AlreadyExists:
            existing = self.get(request_id)
            if existing.request.owner_id != owner_id or existing.request.sample_ids != ids:
                raise DeletionLogError(
                    f"request id {request_id!r} already exists with different content "
                    f"(owner {existing.request.owner_id!r}, "
                    f"{len(existing.request.sample_ids)} samples); resubmitting an id needs "
                    "the same owner_id and sample_ids"
                ) from None
            return existing, False
        return RequestRecord(req, RequestState.PENDING, [_initial(req)]), True

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
        _check_transition(request_id, record.state, new)
        try:
            json.dumps(details)
        except (TypeError, ValueError) as e:
            raise DeletionLogError(f"transition details must be JSON-serialisable: {e}") from e
        # Strictly after this request's latest event even if clocks disagree across hosts,
        # so name order is this request's causal order.
        ns = max(time.time_ns(), last_ns + 1, self._last_ns + 1)
        self._last_ns = ns
        at = ns / 1e9
        name = f"{ns:0{_NS_WIDTH}d}-{request_id}-{uuid.uuid4().hex[:_SUFFIX_WIDTH]}.json"
        body = {"request_id": request_id, "state": new.value, "at": at, "details": details}
        self.storage.write_bytes(
            self._event_path(name), json.dumps(body, sort_keys=True).encode(), exclusive=True
        )
        record.state = new
        record.history.append({"state": new.value, "at": at, "details": details})
        return record

    # -- reading ---------------------------------------------------------------------
    def get(self, request_id: str) -> RequestRecord:
        """The current record of one request (reads only that request's files)."""
        return self._fold_one(request_id)[0]

    def records(self) -> list[RequestRecord]:
        """Every readable request, ordered by received_at then id."""
        # List events before reading requests: an event is written after its request, so
        # every listed event's request is then in the requests listing.
        names = self._event_names()
        requests = self._read_requests()
        events = self._read_events(names)
        recs = {rid: self._fold(req, events.get(rid, []))[0] for rid, req in requests.items()}
        for rid in events.keys() - requests.keys():
            log.warning(
                "deletion log: %d event(s) for unknown request %r skipped", len(events[rid]), rid
            )
        return sorted(recs.values(), key=lambda r: (r.request.received_at, r.request_id))

    def unfinished(self) -> list[RequestRecord]:
        """Requests still owed an execution: pending, executing (maybe orphaned by a crash)
        or failed."""
        return [r for r in self.records() if r.state in UNFINISHED]

    def deleted_sample_ids(self) -> set[int]:
        """Samples whose deletion is done."""
        return self._sample_ids(done_only=True)

    def requested_sample_ids(self) -> set[int]:
        """Samples named by any logged request, whatever its state (pending, executing, done
        or failed): everything that must not be used any more."""
        return self._sample_ids(done_only=False)

    def _sample_ids(self, done_only: bool) -> set[int]:
        out: set[int] = set()
        for r in self.records():
            if not done_only or r.state is RequestState.DONE:
                out.update(r.request.sample_ids)
        return out

    def requests_for_sample(self, sample_id: int) -> list[RequestRecord]:
        """Every request naming ``sample_id`` (audit)."""
        sid = operator.index(sample_id)
        return [r for r in self.records() if _contains(r.request.sample_ids, sid)]

    def requests_for_owner(self, owner_id: str) -> list[RequestRecord]:
        """Every request made for ``owner_id`` (audit)."""
        return [r for r in self.records() if r.request.owner_id == owner_id]

    # -- folding ---------------------------------------------------------------------
    def _fold_one(self, request_id: str) -> tuple[RequestRecord, int]:
        _check_request_id(request_id)
        path = self._request_path(request_id)
        try:
            raw = self.storage.read_bytes(path)
        except StorageError:
            raise DeletionLogError(f"unknown deletion request {request_id!r}") from None
        try:
            req = _parse_request(raw, request_id)
        except (ValueError, KeyError, TypeError) as e:
            raise DeletionLogError(
                f"deletion request {request_id!r} is stored but unreadable ({path}): {e}"
            ) from e
        names = [n for n in self._event_names() if _event_request_id(n) == request_id]
        return self._fold(req, self._read_events(names).get(request_id, []))

    def _fold(self, req: DeletionRequest, events: list[_Event]) -> tuple[RequestRecord, int]:
        rec = RequestRecord(copy.deepcopy(req), RequestState.PENDING, [_initial(req)])
        last_ns = 0
        for ev in sorted(events, key=lambda e: e.name):
            last_ns = max(last_ns, ev.ns)
            if ev.state not in ALLOWED_TRANSITIONS[rec.state]:
                log.warning(
                    "deletion log: event %s (%s -> %s) is not a valid transition; skipped "
                    "(concurrent writers on one request?)",
                    ev.name,
                    rec.state.value,
                    ev.state.value,
                )
                continue
            rec.state = ev.state
            rec.history.append(
                {"state": ev.state.value, "at": ev.at, "details": copy.deepcopy(ev.details)}
            )
        return rec, last_ns

    def _event_names(self) -> list[str]:
        out = []
        for name in self.storage.listdir(self.layout.deletion_events):
            if name.startswith(".tmp-"):
                log.debug("deletion log: temp file %s skipped (a write in flight or crashed)", name)
            elif _EVENT_RE.match(name):
                out.append(name)
            else:
                log.warning("deletion log: unexpected file %r in the events folder skipped", name)
        return out

    def _read_events(self, names: list[str]) -> dict[str, list[_Event]]:
        by_request: dict[str, list[_Event]] = {}
        for name in names:
            if name in self._events_seen:
                ev = self._events_seen[name]
                by_request.setdefault(ev.request_id, []).append(ev)
                continue
            m = _EVENT_RE.match(name)
            assert m is not None  # filtered by _event_names
            try:
                obj = json.loads(self.storage.read_bytes(self._event_path(name)))
                if obj["request_id"] != m.group(2):
                    raise ValueError(f"names request {obj['request_id']!r}, file name does not")
                details = obj.get("details") or {}
                if not isinstance(details, dict):
                    raise ValueError("details is not an object")
                ev = _Event(
                    name,
                    int(m.group(1)),
                    m.group(2),
                    RequestState(obj["state"]),
                    _check_time("at", obj["at"]),
                    details,
                )
            except (StorageError, ValueError, KeyError, TypeError) as e:
                log.warning("deletion log: unreadable event file %s skipped: %s", name, e)
                continue
            self._events_seen[name] = ev
            by_request.setdefault(ev.request_id, []).append(ev)
        return by_request

    def _read_requests(self) -> dict[str, DeletionRequest]:
        out: dict[str, DeletionRequest] = {}
        for name in self.storage.listdir(self.layout.deletion_requests):
            if name.startswith(".tmp-"):
                log.debug("deletion log: temp file %s skipped", name)
                continue
            if not name.endswith(".json"):
                log.warning("deletion log: unexpected file %r in the requests folder skipped", name)
                continue
            rid = name[: -len(".json")]
            if name in self._requests_seen:
                out[rid] = self._requests_seen[name]
                continue
            try:
                out[rid] = self._requests_seen[name] = _parse_request(
                    self.storage.read_bytes(f"{self.layout.deletion_requests}/{name}"), rid
                )
            except (StorageError, ValueError, KeyError, TypeError) as e:
                log.warning("deletion log: unreadable request file %s skipped: %s", name, e)
        return out


def _initial(req: DeletionRequest) -> dict[str, Any]:
    return {"state": RequestState.PENDING.value, "at": req.received_at, "details": {}}


def _parse_request(raw: bytes, request_id: str) -> DeletionRequest:
    req = DeletionRequest.from_json(json.loads(raw))
    if req.request_id != request_id:
        raise ValueError(f"file of {request_id!r} holds request {req.request_id!r}")
    return req


def _event_request_id(name: str) -> str | None:
    m = _EVENT_RE.match(name)
    return m.group(2) if m else None


def _contains(sorted_ids: list[int], sid: int) -> bool:
    i = bisect.bisect_left(sorted_ids, sid)
    return i < len(sorted_ids) and sorted_ids[i] == sid
