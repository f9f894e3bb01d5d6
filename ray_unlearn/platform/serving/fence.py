"""Fencing gateways by lease through the storage root: a deletion is acknowledged only once
every live gateway of the run can no longer answer from a view of the log that lacks it.

No coordinator process is assumed (a CLI ``forget`` without a cluster, a Python client,
``ray job submit`` and any number of gateway replicas all write the same log), so the fence
lives in files under the run::

    runs/<id>/gateways/<replica>.json    one per live gateway replica (written atomically)
    runs/<id>/deletions/acks/<rid>.json  when a request was acknowledged, and who confirmed

A gateway replica's registration holds ``view_at``: the wall time (unix seconds) at which its
latest successful read of the deletion log *started*, published only after the replica holds
that view. The replica answers only while ``now < view_at + lease_s``; past that it reads the
log again first, or refuses (503). It writes the registration before its first read
(``view_at`` null) and removes it on a clean shutdown, after it stopped answering.

:func:`await_fence` is the acknowledging side. With ``t_w`` the time the request file was
durable, it lists the registrations and waits until each has ``view_at > t_w + skew`` (that
read started after the request existed, so the replica holds it) or is gone (deregistered),
or until ``now > t_w + lease_s + skew``: every view that started before ``t_w`` has then
expired, so a replica that did not confirm (crashed, partitioned, slow) cannot answer from
it. A replica that registers after the listing starts its first read after ``t_w`` and sees
the request. So the acknowledgement waits at most ``lease_s + skew`` and never skips a
gateway. No Ray here.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ray_unlearn.platform.core.storage import AlreadyExists, RunLayout, Storage, StorageError

DEFAULT_LEASE_S = 2.0  # how long a gateway may answer from one read of the log (s)
DEFAULT_INTERVAL_S = 0.1  # how often a gateway reads the log (s): an ack usually waits ~this
DEFAULT_CLOCK_SKEW_S = 0.05  # bound on wall-clock disagreement between hosts of a run (s)


class FenceError(ValueError):
    """Bad fence settings or an unreadable registration."""


@dataclass(frozen=True)
class FenceSettings:
    """A gateway's fencing settings (seconds). ``interval_s`` < ``lease_s`` so that a
    replica refreshes its view several times per lease and answers rarely wait for a read."""

    lease_s: float = DEFAULT_LEASE_S
    interval_s: float = DEFAULT_INTERVAL_S
    clock_skew_s: float = DEFAULT_CLOCK_SKEW_S

    def __post_init__(self) -> None:
        problems = []
        for name in ("lease_s", "interval_s"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                problems.append(f"{name} must be a finite number > 0, got {v!r}")
        v = self.clock_skew_s
        if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
            problems.append(f"clock_skew_s must be a finite number >= 0, got {v!r}")
        if not problems and self.interval_s >= self.lease_s:
            problems.append(
                f"interval_s ({self.interval_s}) must be below lease_s ({self.lease_s}): a "
                "replica must read the log again before its view expires"
            )
        if problems:
            raise FenceError("fence settings: " + "; ".join(problems))


def gateways_dir(layout: RunLayout) -> str:
    return f"{layout.root}/gateways"


def registration_path(layout: RunLayout, replica: str) -> str:
    return f"{gateways_dir(layout)}/{replica}.json"


def ack_path(layout: RunLayout, request_id: str) -> str:
    return f"{layout.root}/deletions/acks/{request_id}.json"


@dataclass
class Registration:
    """What one gateway replica publishes about its view of the log."""

    replica: str
    lease_s: float
    clock_skew_s: float
    view_at: float | None = None  # start of the latest read it holds (unix s); None: none yet
    heartbeat_at: float = 0.0  # when this file was written (unix s)
    host: str = ""
    pid: int = 0

    @classmethod
    def new(cls, replica: str, settings: FenceSettings) -> Registration:
        return cls(
            replica,
            settings.lease_s,
            settings.clock_skew_s,
            host=socket.gethostname(),
            pid=os.getpid(),
        )

    @classmethod
    def from_json(cls, obj: Any) -> Registration:
        if not isinstance(obj, dict):
            raise FenceError(f"a gateway registration must be an object, got {obj!r}")
        try:
            reg = cls(
                replica=str(obj["replica"]),
                lease_s=float(obj["lease_s"]),
                clock_skew_s=float(obj.get("clock_skew_s", DEFAULT_CLOCK_SKEW_S)),
                view_at=None if obj.get("view_at") is None else float(obj["view_at"]),
                heartbeat_at=float(obj.get("heartbeat_at", 0.0)),
                host=str(obj.get("host", "")),
                pid=int(obj.get("pid", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FenceError(f"unreadable gateway registration {obj!r}: {e}") from None
        if not (math.isfinite(reg.lease_s) and reg.lease_s > 0):
            raise FenceError(f"gateway registration {reg.replica!r}: bad lease_s {reg.lease_s}")
        return reg


def write_registration(
    storage: Storage, layout: RunLayout, reg: Registration, *, durable: bool = True
) -> None:
    """Write (atomically) what ``reg`` publishes. ``durable=False``, for the updates a
    replica makes several times a second: on a local disk the file is replaced (temp file
    + rename, so never seen torn) without the two fsyncs, which under I/O load took
    hundreds of ms each publish. Safe: readers see it through the host's page cache at once,
    and a crash of that host, the only way to lose the update, kills the replica too; and a
    lost update could only roll ``view_at`` back, which makes an acknowledgement wait longer,
    never return early. The first registration stays durable (``durable=True``): its file
    missing would read as "deregistered". Elsewhere (NFS via its close-to-open flush, object
    stores) the storage's own write is used."""
    reg.heartbeat_at = time.time()
    path = registration_path(layout, reg.replica)
    data = json.dumps(asdict(reg), sort_keys=True).encode()
    if durable or not storage.local:
        storage.write_bytes(path, data)
        return
    full = storage.full(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(full), prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, full)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_registration(storage: Storage, layout: RunLayout, replica: str) -> None:
    """Deregister (clean shutdown). Call only after the replica stopped answering."""
    storage.delete(registration_path(layout, replica))


def _read(storage: Storage, layout: RunLayout, replica: str) -> Registration | None:
    """The registration of ``replica``, or None when it is gone (deregistered)."""
    path = registration_path(layout, replica)
    try:
        raw = storage.read_bytes(path)
    except StorageError:
        return None
    try:
        return Registration.from_json(json.loads(raw))
    except (ValueError, FenceError):
        # Written atomically, so unreadable means damaged: it still names a live gateway
        # whose view we cannot see, so it is fenced only by its lease running out.
        return Registration(replica, DEFAULT_LEASE_S, DEFAULT_CLOCK_SKEW_S)


def list_registrations(storage: Storage, layout: RunLayout) -> list[Registration]:
    out = []
    for name in storage.listdir(gateways_dir(layout)):
        if name.endswith(".json") and not name.startswith("."):
            reg = _read(storage, layout, name[: -len(".json")])
            if reg is not None:
                out.append(reg)
    return out


def await_fence(
    storage: Storage,
    layout: RunLayout,
    written_at: float,
    *,
    poll_s: float = 0.02,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, list[str]]:
    """Wait until every gateway registered now is fenced for a request durable at
    ``written_at`` (see the module docstring). Returns the replicas by how they were fenced:
    ``confirmed`` (their view holds it), ``expired`` (their lease ran out first) and
    ``deregistered`` (shut down meanwhile) and ``dead`` (its process, on this host, no longer
    exists: its file is removed). Bounded by the largest lease + skew listed."""
    out: dict[str, list[str]] = {"confirmed": [], "expired": [], "deregistered": [], "dead": []}
    waiting = {r.replica: r for r in list_registrations(storage, layout)}
    while waiting:
        now = clock()
        for replica, listed in list(waiting.items()):
            reg = _read(storage, layout, replica)
            if reg is None:
                out["deregistered"].append(replica)
            elif _process_gone(reg):
                # a replica killed without deregistering (kill -9, OOM) answers nothing more;
                # its file would otherwise cost every later acknowledgement a whole lease
                remove_registration(storage, layout, replica)
                out["dead"].append(replica)
            elif reg.view_at is not None and reg.view_at > written_at + reg.clock_skew_s:
                out["confirmed"].append(replica)
            elif now > written_at + max(reg.lease_s, listed.lease_s) + reg.clock_skew_s:
                out["expired"].append(replica)
            else:
                continue
            del waiting[replica]
        if waiting:
            sleep(poll_s)
    return {k: sorted(v) for k, v in out.items()}


def _process_gone(reg: Registration) -> bool:
    """True when ``reg`` names a process on this host that no longer exists. Only a process
    that exists can answer, so such a registration fences nothing; on another host liveness
    cannot be told from here and the lease bounds the wait instead. (Host names are taken to
    be unique per process namespace, as they are for nodes of a Ray cluster.)"""
    if reg.pid <= 0 or reg.host != socket.gethostname():
        return False
    try:
        os.kill(reg.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by another user
        return False
    return False


def record_ack(
    storage: Storage, layout: RunLayout, request_id: str, written_at: float, fenced: dict
) -> dict[str, Any]:
    """Durably record the acknowledgement (first one wins: a resubmission keeps the earliest,
    which is when the promise started). Returns the stored record."""
    doc = {
        "request_id": request_id,
        "written_at": written_at,
        "acknowledged_at": time.time(),
        **fenced,
    }
    try:
        storage.write_bytes(
            ack_path(layout, request_id), json.dumps(doc, sort_keys=True).encode(), exclusive=True
        )
    except AlreadyExists:
        return read_ack(storage, layout, request_id) or doc
    return doc


def read_ack(storage: Storage, layout: RunLayout, request_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(ack_path(layout, request_id)))
    except (StorageError, ValueError):
        return None


def read_acks(storage: Storage, layout: RunLayout) -> dict[str, float]:
    """request id -> acknowledged_at, for every readable acknowledgement of the run."""
    out = {}
    folder = f"{layout.root}/deletions/acks"
    for name in storage.listdir(folder):
        if name.endswith(".json") and not name.startswith("."):
            doc = read_ack(storage, layout, name[: -len(".json")])
            if doc is not None and isinstance(doc.get("acknowledged_at"), int | float):
                out[str(doc["request_id"])] = float(doc["acknowledged_at"])
    return out
