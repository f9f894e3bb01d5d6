"""One executor at a time per run, across processes: a lease in the storage root.

A lease is a sequence of small JSON files, one per holder, created exclusively::

    runs/<id>/lease/<generation:08d>.json   holder, host, pid, acquired/renewed/expires (s)

The holder is the highest generation. A lease is free when that file says ``released``,
when its expiry has passed (the holder stopped renewing), or when it names a process on
this host that no longer exists (kill -9). A taker claims a free lease by creating the
*next* generation exclusively, so of two takers exactly one wins; the generation is the
fencing token: a holder checks that no higher generation exists before every effect that
must be its own (:meth:`Lease.check`, one ``exists`` call).

The lease is taken around one execution (``UnlearningEngine.execute_pending``, an S3T
restore's publish), not for a process's lifetime: an idle executor actor or gateway must
not block a one-off ``ray-unlearn forget``. While held, a daemon thread renews it every
``ttl_s / 3`` seconds.

On a local disk the exclusive create is one atomic step (``os.link``). pyarrow's object
store filesystems (S3, GCS) have no conditional PUT, so there it is check-then-write: two
takers racing within one round trip could both believe they won. The platform assumes a
single writer per run on object stores (one executor process, or executions serialised by
the operator); the lease then only guards against overlapping runs of that writer.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from ray_unlearn.platform.core.storage import AlreadyExists, Storage, StorageError

DEFAULT_TTL_S = 30.0  # a holder that stops renewing is taken over after this many seconds
POLL_S = 0.2  # how often a waiting taker looks again
KEEP = 4  # lease files kept behind the newest (older ones are pruned by the next taker)


class LeaseError(RuntimeError):
    """The lease could not be taken in time, or a holder lost it (a newer generation exists)."""


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a running (not zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: it holds nothing
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class Lease:
    """The single-executor lease of one run (``folder``: e.g. ``runs/<id>/lease``)."""

    def __init__(
        self,
        storage: Storage,
        folder: str,
        *,
        holder: str = "executor",
        ttl_s: float = DEFAULT_TTL_S,
    ):
        if not ttl_s > 0:
            raise ValueError(f"lease ttl_s must be a positive number of seconds, got {ttl_s!r}")
        self.storage, self.folder, self.holder, self.ttl_s = (
            storage,
            folder.rstrip("/"),
            holder,
            ttl_s,
        )
        self.generation: int | None = None  # held generation, None when not held
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Lease({self.folder!r}, generation={self.generation})"

    # -- files -----------------------------------------------------------------------
    def _path(self, gen: int) -> str:
        return f"{self.folder}/{gen:08d}.json"

    def _generations(self) -> list[int]:
        return sorted(
            int(n[:-5])
            for n in self.storage.listdir(self.folder)
            if n[:-5].isdigit() and n.endswith(".json")
        )

    def _read(self, gen: int) -> dict[str, Any] | None:
        try:
            return self.storage.read_json(self._path(gen))
        except (StorageError, ValueError):  # pruned meanwhile, or torn by a crash
            return None

    def _record(self, gen: int, now: float, acquired: float, released: bool = False) -> dict:
        return {
            "generation": gen,
            "holder": self.holder,
            "token": self._token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired_at": acquired,
            "renewed_at": now,
            "expires_at": now + self.ttl_s,
            "released": released,
        }

    def current(self) -> tuple[int, dict[str, Any] | None]:
        """(highest generation, its record); (0, None) when the lease was never taken."""
        gens = self._generations()
        if not gens:
            return 0, None
        return gens[-1], self._read(gens[-1])

    @staticmethod
    def is_free(record: dict[str, Any] | None, now: float | None = None) -> bool:
        if record is None:  # never taken, or a torn file: its writer crashed mid-write
            return True
        if record.get("released"):
            return True
        if (now or time.time()) >= float(record.get("expires_at", 0.0)):
            return True
        return record.get("host") == socket.gethostname() and not _pid_alive(int(record["pid"]))

    # -- taking and giving back --------------------------------------------------------
    def acquire(
        self,
        timeout_s: float | None = None,
        on_wait: Callable[[dict[str, Any]], None] | None = None,
    ) -> int:
        """Wait until the lease is free, take it, start renewing; returns the generation.

        ``on_wait(record)`` is called once, with the holder's record, if this has to wait.
        Raises :class:`LeaseError` after ``timeout_s`` seconds (None: wait as long as it takes).
        """
        if self.generation is not None:
            raise LeaseError(f"{self!r} is already held by this process")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        told = False
        while True:
            gen, record = self.current()
            if self.is_free(record):
                now = time.time()
                try:
                    self.storage.write_json(
                        self._path(gen + 1), self._record(gen + 1, now, now), exclusive=True
                    )
                except AlreadyExists:
                    continue  # another taker won this generation: look again
                self.generation, self._expires = gen + 1, now + self.ttl_s
                self._prune(gen + 1)
                self._start_renewing()
                return gen + 1
            if not told and on_wait is not None:
                on_wait(record)
                told = True
            if deadline is not None and time.monotonic() >= deadline:
                raise LeaseError(
                    f"the lease {self._path(gen)} is held by {record.get('holder')} "
                    f"(pid {record.get('pid')} on {record.get('host')}) for more than {timeout_s} s"
                )
            time.sleep(POLL_S)

    def check(self) -> None:
        """Raise :class:`LeaseError` unless this process still holds the lease: no newer
        generation exists and the last renewal has not expired."""
        if self.generation is None:
            raise LeaseError(f"{self.folder}: the lease is not held by this process")
        if time.time() >= self._expires:
            raise LeaseError(
                f"{self._path(self.generation)}: the lease expired before it was renewed "
                f"(ttl {self.ttl_s} s); another executor may have taken over"
            )
        if self.storage.exists(self._path(self.generation + 1)):
            raise LeaseError(
                f"{self._path(self.generation)}: the lease was taken over by generation "
                f"{self.generation + 1}; this executor must stop publishing"
            )

    def release(self) -> None:
        """Stop renewing and mark the lease free (if it is still ours)."""
        if self.generation is None:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        gen, self.generation = self.generation, None
        with self._lock:
            if not self.storage.exists(self._path(gen + 1)):
                rec = self._read(gen) or {}
                now = time.time()
                self.storage.write_json(
                    self._path(gen),
                    self._record(gen, now, rec.get("acquired_at", now), released=True),
                )

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- renewing ----------------------------------------------------------------------
    def _start_renewing(self) -> None:
        self._stop = threading.Event()
        gen = self.generation
        acquired = time.time()
        self._renewer = threading.Thread(
            target=self._renew_loop, args=(gen, acquired), name=f"lease-renew-{gen}", daemon=True
        )
        self._renewer.start()

    def _renew_loop(self, gen: int, acquired: float) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew(gen, acquired)
            except LeaseError:
                return  # taken over: check() reports it to the holder's next effect
            except Exception:  # a storage hiccup: try again next period, check() times out
                continue

    def renew(self, gen: int, acquired: float) -> None:
        with self._lock:
            if self.storage.exists(self._path(gen + 1)):
                raise LeaseError(f"{self._path(gen)} was taken over")
            now = time.time()
            self.storage.write_json(self._path(gen), self._record(gen, now, acquired))
            self._expires = now + self.ttl_s

    def _prune(self, newest: int) -> None:
        """Delete the lease file ``KEEP`` generations behind: each taker deletes one, so the
        folder stays at about ``KEEP + 1`` files and listing it stays cheap."""
        old = newest - KEEP - 1
        if old > 0:
            self.storage.delete(self._path(old))


def describe(record: dict[str, Any] | None) -> str:
    """One line about a lease record, for a waiting taker's message."""
    if not record:
        return "another executor"
    left = float(record.get("expires_at", 0.0)) - time.time()
    return (
        f"{record.get('holder')} (pid {record.get('pid')} on {record.get('host')}, "
        f"generation {record.get('generation')}, renewal due within {max(left, 0):.0f} s)"
    )
