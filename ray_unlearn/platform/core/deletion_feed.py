"""How readers of the deletion log find changes without listing the whole log: a feed of
change markers in time buckets, compacted snapshots, and the one-time migration of the first
layout. The log itself (writing, folding, queries) is platform/core/deletion_log.py.

Feed markers are empty files named ``<marker ns>~<request id>~<record file>``, in the folder
of the 10-second bucket of their ns::

    deletions/feed/<ns // BUCKET_NS :012d>/<ns:020d>~<request_id>~<record>

``<record>`` is ``request.json`` or an event's file name under ``deletions/r/<request_id>/``,
so a reader that sees a marker reads exactly one record, by path. A writer writes the marker
*before* the record and acknowledges only after both, and re-marks when the record became
durable more than ``WRITE_WINDOW_NS / 2`` after its marker; a reader keeps retrying a marker
whose record is not there yet while the marker is younger than ``WRITE_WINDOW_NS + SKEW_NS``.
So a poll that starts at T sees every record acknowledged before T, if hosts' clocks agree to
within ``SKEW_NS`` (an assumption: NTP keeps them within milliseconds). A poll lists only the
buckets from its previous poll's start minus that window to now: its cost is the changes, not
the log.

Snapshots (``deletions/snapshots/<taken ns:020d>-<8 hex>.json``) hold every request with its
raw events, folded states, the done and requested sample ids and the owner index, as seen by
a poll that started at ``taken_at_ns``. A cold reader loads the newest and then follows the
feed from ``taken_at_ns`` minus the window: one snapshot plus a short tail. A snapshot is
written whole (atomic replace / one PUT) under a new name and deletes no record, so a crash
while writing one loses nothing (the older snapshot and the feed are still there).
"""

from __future__ import annotations

import gc
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ray_unlearn.platform.core.storage import AlreadyExists, RunLayout, Storage, StorageError

log = logging.getLogger("ray_unlearn.platform.core.deletion_log")

BUCKET_NS = 10 * 10**9  # feed folder width: a poll lists ~3 of them
WRITE_WINDOW_NS = 10 * 10**9  # longest a record may take to follow its marker, unre-marked
SKEW_NS = 5 * 10**9  # assumed bound on clock disagreement between writer and reader hosts
LOOKBACK_NS = WRITE_WINDOW_NS + SKEW_NS
KEEP_SNAPSHOTS = 3
SNAPSHOT_FORMAT = 1
REQUEST_FILE = "request.json"
EVENT_RE = re.compile(r"^(\d{20})-([0-9a-f]{8})\.json$")
_MARKER_RE = re.compile(r"^(\d{20})~([A-Za-z0-9][A-Za-z0-9._-]{0,127})~([^~/]+)$")
_SNAPSHOT_RE = re.compile(r"^(\d{20})-[0-9a-f]{8}\.json$")


def marker_name(ns: int, request_id: str, record: str) -> str:
    return f"{ns:020d}~{request_id}~{record}"


def parse_marker(name: str) -> tuple[int, str, str] | None:
    """(marker ns, request id, record file name), or None for anything else."""
    m = _MARKER_RE.match(name)
    if m is None or not (m.group(3) == REQUEST_FILE or EVENT_RE.match(m.group(3))):
        return None
    return int(m.group(1)), m.group(2), m.group(3)


def write_marker(storage: Storage, layout: RunLayout, request_id: str, record: str) -> int:
    """Write a fresh marker for ``record`` of ``request_id``; returns its ns."""
    ns = time.time_ns()
    name = marker_name(ns, request_id, record)
    storage.touch(f"{layout.deletion_feed}/{ns // BUCKET_NS:012d}/{name}")
    return ns


def remark_if_late(storage: Storage, layout: RunLayout, request_id: str, record: str, ns: int):
    """After ``record`` is durable: mark it again if it came too long after its marker (a
    reader may have stopped waiting for it). Called before acknowledging."""
    if time.time_ns() - ns > WRITE_WINDOW_NS // 2:
        write_marker(storage, layout, request_id, record)


def list_markers(storage: Storage, layout: RunLayout, lo_ns: int, hi_ns: int) -> Iterator[str]:
    """Marker names in the buckets covering [lo_ns, hi_ns], bucket by bucket (time order).
    A long range lists the feed's bucket folders once instead of naming every bucket."""
    lo, hi = lo_ns // BUCKET_NS, hi_ns // BUCKET_NS
    if hi - lo > 64:
        buckets = [
            int(b)
            for b in storage.listdir(layout.deletion_feed)
            if b.isdigit() and lo <= int(b) <= hi
        ]
    else:
        buckets = list(range(lo, hi + 1))
    for b in buckets:
        yield from storage.listdir(f"{layout.deletion_feed}/{b:012d}")


def first_marker_ns(storage: Storage, layout: RunLayout) -> int | None:
    """Start of the oldest feed bucket (a cold reader with no snapshot starts there)."""
    buckets = [int(b) for b in storage.listdir(layout.deletion_feed) if b.isdigit()]
    return min(buckets) * BUCKET_NS if buckets else None


# -- snapshots ----------------------------------------------------------------------------------


def write_snapshot(storage: Storage, layout: RunLayout, doc: dict[str, Any]) -> str:
    """Write one snapshot under a new name (never over another), then prune old ones."""
    name = f"{doc['taken_at_ns']:020d}-{uuid.uuid4().hex[:8]}.json"
    data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    storage.write_bytes(f"{layout.deletion_snapshots}/{name}", data, exclusive=True)
    names = [n for n in storage.listdir(layout.deletion_snapshots) if _SNAPSHOT_RE.match(n)]
    for old in names[:-KEEP_SNAPSHOTS]:
        storage.delete(f"{layout.deletion_snapshots}/{old}")
    return name


def read_newest_snapshot(storage: Storage, layout: RunLayout) -> dict[str, Any] | None:
    """The newest readable snapshot (an unreadable one is skipped with a warning)."""
    names = [n for n in storage.listdir(layout.deletion_snapshots) if _SNAPSHOT_RE.match(n)]
    for name in reversed(names):
        try:
            raw = storage.read_bytes(f"{layout.deletion_snapshots}/{name}")
            was = gc.isenabled()
            gc.disable()  # one large document: see deletion_log._gc_paused
            try:
                doc = json.loads(raw)
            finally:
                if was:
                    gc.enable()
            if doc.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {SNAPSHOT_FORMAT}")
            return doc
        except (StorageError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("deletion log: snapshot %s unreadable, an older one is used: %s", name, e)
    return None


# -- the first layout -------------------------------------------------------------------------

_LEGACY_EVENT_RE = re.compile(r"^(\d{20})-(.+)-([0-9a-f]{8})\.json$")


def migrate_legacy(storage: Storage, layout: RunLayout) -> int:
    """Copy a log of the first layout (``deletions/requests/<id>.json`` and
    ``deletions/events/<ns>-<id>-<hex>.json``: every read listed both whole) into per-request
    folders with feed markers, once; returns the files copied (0 when there is nothing to do).

    Idempotent and crash-safe: every copy is an exclusive create whose "already there" is
    success, and ``deletions/migrated.json`` is written last, so an interrupted migration is
    finished by the next open. The old files stay where they were (nothing is deleted); writers
    of the old layout must be stopped first (a file they add afterwards is not read)."""
    if storage.exists(layout.deletion_migrated):
        return 0
    old_requests = [
        n for n in storage.listdir(layout.deletion_requests) if not n.startswith(".tmp-")
    ]
    old_events = [n for n in storage.listdir(layout.deletion_events) if not n.startswith(".tmp-")]
    if not old_requests and not old_events:
        return 0
    log.warning(
        "deletion log of run %s: migrating %d request(s) and %d event(s) from the first "
        "layout (deletions/requests, deletions/events) to per-request folders "
        "(deletions/r/<id>/) with a change feed; this happens once, the old files are kept",
        layout.run_id,
        len(old_requests),
        len(old_events),
    )
    copied = 0

    def copy(src: str, request_id: str, record: str) -> None:
        nonlocal copied
        try:
            data = storage.read_bytes(src)
            json.loads(data)  # a torn file stays behind (the reader warned about it before)
        except (StorageError, ValueError) as e:
            log.warning("deletion log: unreadable file %s not migrated: %s", src, e)
            return
        write_marker(storage, layout, request_id, record)
        try:
            storage.write_bytes(
                f"{layout.deletion_request_dir(request_id)}/{record}", data, exclusive=True
            )
        except AlreadyExists:
            pass
        copied += 1

    for name in old_requests:
        if name.endswith(".json"):
            copy(f"{layout.deletion_requests}/{name}", name[: -len(".json")], REQUEST_FILE)
    for name in old_events:
        m = _LEGACY_EVENT_RE.match(name)
        if m:
            copy(f"{layout.deletion_events}/{name}", m.group(2), f"{m.group(1)}-{m.group(3)}.json")
    storage.write_json(
        layout.deletion_migrated, {"migrated_at": time.time(), "files": copied, "from": "v1"}
    )
    return copied
