"""The records of the deletion log: requests, their states and transitions, and the fold of
a request's events into its current record. Pure data and validation (no storage here); the
log itself is platform/core/deletion_log.py.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

log = logging.getLogger("ray_unlearn.platform.core.deletion_log")

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


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


def check_transition(request_id: str, current: RequestState, new: RequestState) -> None:
    allowed = ALLOWED_TRANSITIONS[current]
    if new not in allowed:
        names = ", ".join(sorted(s.value for s in allowed)) or "none (final state)"
        raise DeletionLogError(
            f"request {request_id!r}: transition {current.value} -> {new.value} is not "
            f"allowed; from {current.value} the allowed states are: {names}"
        )


def check_request_id(request_id: Any) -> str:
    if not isinstance(request_id, str) or not REQUEST_ID_RE.match(request_id):
        raise DeletionLogError(
            f"bad request id {request_id!r}: it must match {REQUEST_ID_RE.pattern} "
            "(letters, digits, '.', '_', '-'; at most 128 characters; it names a file)"
        )
    return request_id


def normalise_sample_ids(sample_ids: Any) -> list[int]:
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


def check_time(name: str, value: Any) -> float:
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
            request_id=check_request_id(obj["request_id"]),
            sample_ids=normalise_sample_ids(obj["sample_ids"]),
            owner_id=owner,
            received_at=check_time("received_at", obj["received_at"]),
            deadline=None if deadline is None else check_time("deadline", deadline),
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
class Event:
    name: str
    ns: int
    request_id: str
    state: RequestState
    at: float
    details: dict[str, Any]


def initial_entry(req: DeletionRequest) -> dict[str, Any]:
    return {"state": RequestState.PENDING.value, "at": req.received_at, "details": {}}


def parse_request(raw: bytes, request_id: str) -> DeletionRequest:
    req = DeletionRequest.from_json(json.loads(raw))
    if req.request_id != request_id:
        raise ValueError(f"file of {request_id!r} holds request {req.request_id!r}")
    return req


def parse_event(raw: bytes, name: str, ns: int, request_id: str) -> Event:
    """One stored event; raises ValueError/KeyError/TypeError on a damaged file."""
    obj = json.loads(raw)
    if obj["request_id"] != request_id:
        raise ValueError(f"names request {obj['request_id']!r}, file name does not")
    details = obj.get("details") or {}
    if not isinstance(details, dict):
        raise ValueError("details is not an object")
    return Event(
        name, ns, request_id, RequestState(obj["state"]), check_time("at", obj["at"]), details
    )


def fold(req: DeletionRequest, events: Iterable[Event]) -> tuple[RequestRecord, int]:
    """The record of ``req`` after its events in name (= time) order, and the newest event's
    ns. An event that is not a valid transition from the folded state (two writers racing on
    one request) is skipped with a warning, so every reader folds to the same state."""
    rec = RequestRecord(clone_request(req), RequestState.PENDING, [initial_entry(req)])
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
        rec.history.append({"state": ev.state.value, "at": ev.at, "details": clone(ev.details)})
    return rec, last_ns


def clone(value: Any) -> Any:
    """A deep copy of JSON data (dicts, lists, scalars): much cheaper than copy.deepcopy,
    which folding every request of a large log would spend most of its time in."""
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone(v) for v in value]
    return value


def clone_request(req: DeletionRequest) -> DeletionRequest:
    return DeletionRequest(
        req.request_id, list(req.sample_ids), req.owner_id, req.received_at, req.deadline
    )
