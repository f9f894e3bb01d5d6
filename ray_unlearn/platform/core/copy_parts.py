"""The run's own copy of its data as part files under a manifest, so that removing a few rows
rewrites only the parts that hold them.

The copy was one Parquet file: removing one owner's rows decoded, filtered and re-encoded all
of it (100k rows x 600 float features: ~1.6 s of CPU and a ~10 MB write per deletion, more
than retraining a late slice). Now::

    runs/<id>/data/parts/<first sample id:020d>-<8 hex>.parquet    rows sorted by sample_id,
                                                                   ~1 MiB decoded each
    runs/<id>/data/manifests/<generation:010d>.json                {"parts": [{"file", "rows",
                                                                   "min", "max"}], "rows"}

A part covers the sample ids between its ``min`` and ``max`` (parts are disjoint id ranges:
rows are sorted before they are split), so a reader of some ids opens only the parts whose
range can hold one, and a compaction rewrites only the parts holding a removed row (an owner
of 5 rows spread at random: at most 5 parts of ~430 rows instead of 100k rows).

Switching to a new set of parts is one exclusive create of the next generation's manifest
(atomic on a local disk; check-then-write on object stores, as the registry's): new part
files are written (durably) first, under new names, and the parts they replace are deleted
only after the switch, so a reader sees the old set or the new one, whole. A reader that
loses a race with that deletion (its manifest's part is gone) reads the newest manifest
again. Two compactions racing: the second's create fails and it starts again from the
winner's manifest. A crash between the switch and the deletions leaves replaced parts,
and one before the switch leaves unreferenced new parts: every switch deletes the files no
manifest references that are older than :data:`ORPHAN_AGE_S` (an unfinished switch of a
live writer is younger), and ``audit --residue`` reports any of them still holding a
deleted row.

A run made before parts has the single file ``data/records.parquet``
(:attr:`RunLayout.data_copy`): it is read as one part and converted to parts by its first
compaction (the old file is deleted after the switch).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_unlearn.platform.core.data import SAMPLE_ID
from ray_unlearn.platform.core.data.shard_read import read_rows, row_group_rows
from ray_unlearn.platform.core.storage import (
    AlreadyExists,
    RunLayout,
    Storage,
    StorageError,
    _fsync_dir,
    table_bytes,
)

# Decoded bytes per part: ~430 rows of 600 float32 features. A compaction re-encodes whole
# parts (~16 us of CPU a row of that size), so an owner's ~5 rows cost ~5 parts; smaller
# parts mean more files to open for a whole read.
PART_BYTES = 1 << 20
_MIN_PART_ROWS = 128
ORPHAN_AGE_S = 600.0  # an unreferenced part older than this is no live writer's: deleted
_MANIFEST_RE = re.compile(r"^(\d{10})\.json$")
_PART_RE = re.compile(r"^(\d{20})-([0-9a-f]{8})\.parquet$")
_RETRIES = 5


@dataclass(frozen=True)
class Manifest:
    generation: int  # 0: a run made before parts (the single file data/records.parquet)
    parts: tuple[dict, ...]  # {"file": path relative to the root, "rows", "min", "max"}

    @property
    def rows(self) -> int:
        return sum(int(p["rows"]) for p in self.parts)

    def files(self) -> list[str]:
        return [p["file"] for p in self.parts]


def _manifest_path(layout: RunLayout, generation: int) -> str:
    return f"{layout.data_manifests}/{generation:010d}.json"


def read_manifest(storage: Storage, layout: RunLayout) -> Manifest | None:
    """The newest manifest; the legacy single file as generation 0; None: no copy."""
    for _ in range(_RETRIES):
        names = [n for n in storage.listdir(layout.data_manifests) if _MANIFEST_RE.match(n)]
        if not names:
            break
        try:
            doc = storage.read_json(f"{layout.data_manifests}/{names[-1]}")
        except StorageError:  # pruned by a newer switch between the listing and the read
            continue
        return Manifest(int(doc["generation"]), tuple(doc["parts"]))
    if storage.exists(layout.data_copy):
        return Manifest(0, ({"file": layout.data_copy, "rows": None, "min": None, "max": None},))
    return None


def _may_hold(part: dict, ids: np.ndarray) -> bool:
    """Can ``part`` hold one of ``ids`` (sorted)? From its id range, without opening it."""
    if part["min"] is None:
        return part["rows"] is None  # the legacy file (unknown range); an empty part: no
    lo = np.searchsorted(ids, int(part["min"]), side="left")
    return lo < len(ids) and ids[lo] <= int(part["max"])


def _read_part(storage: Storage, rel: str, columns=None, use_threads: bool = True) -> pa.Table:
    # an Arrow-native file, never a Python buffer: see Storage.read_table
    with storage.fs.open_input_file(storage.full(rel)) as f:
        return pq.read_table(f, columns=columns, use_threads=use_threads)


# (storage uri, part file) -> its sorted sample ids: a part file is never changed once
# written (a new set of parts has new names), so what a process read or wrote stays true.
# 8 bytes a row: 0.8 MB for a 100k-row copy.
_IDS: dict[tuple[str, str], np.ndarray] = {}
_IDS_MAX_ROWS = 50_000_000


def _remember(storage: Storage, rel: str, ids: np.ndarray) -> None:
    if sum(len(v) for v in _IDS.values()) + len(ids) > _IDS_MAX_ROWS:
        _IDS.clear()
    _IDS[(storage.uri, rel)] = ids


def part_ids(storage: Storage, rel: str) -> np.ndarray:
    """The sample ids of one part file (its id column read once per process)."""
    key = (storage.uri, rel)
    if key not in _IDS:
        _remember(storage, rel, _read_part(storage, rel, [SAMPLE_ID])[SAMPLE_ID].to_numpy())
    return _IDS[key]


def _slice_ids(table: pa.Table, entry: dict) -> np.ndarray:
    """The ids of ``table`` (sorted) that fall in a part entry's range."""
    ids = table[SAMPLE_ID].to_numpy()
    if entry["min"] is None:
        return ids[:0]
    return ids[(ids >= entry["min"]) & (ids <= entry["max"])]


def _with_newest(storage: Storage, layout: RunLayout, read):
    """``read(manifest)`` over the newest manifest; again (a few times) if one of its parts
    was deleted meanwhile by a newer switch."""
    for attempt in range(_RETRIES):
        man = read_manifest(storage, layout)
        if man is None:
            raise StorageError(f"run {layout.run_id} has no copy of its data under {storage.uri}")
        try:
            return read(man)
        except (FileNotFoundError, StorageError):
            if attempt == _RETRIES - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise RuntimeError("unreachable")


def _concat(tables: list[pa.Table]) -> pa.Table:
    meta = tables[0].schema.metadata
    return pa.concat_tables(
        [t.replace_schema_metadata(meta) for t in tables]
    ).replace_schema_metadata(meta)


def read_copy(storage: Storage, layout: RunLayout, columns=None) -> pa.Table:
    """The whole copy (every part, in id order), with the records' schema metadata."""
    return _with_newest(
        storage, layout, lambda man: _concat([_read_part(storage, f, columns) for f in man.files()])
    )


def read_copy_rows(storage: Storage, layout: RunLayout, sample_ids: np.ndarray) -> pa.Table:
    """The rows of ``sample_ids`` still in the copy, in id order: only the parts whose id
    range can hold one are opened, each read a row group at a time (shard_read)."""
    wanted = np.unique(np.asarray(sample_ids, dtype=np.int64))

    def read(man: Manifest) -> pa.Table:
        tables = []
        for p in man.parts:
            if _may_hold(p, wanted) or not tables and p is man.parts[-1]:
                # (the last part is read even when nothing is wanted: the schema)
                with storage.fs.open_input_file(storage.full(p["file"])) as f:
                    tables.append(read_rows(f, wanted))
        return _concat(tables)

    return _with_newest(storage, layout, read)


# -- writing ---------------------------------------------------------------------------------


def _sorted(table: pa.Table) -> pa.Table:
    ids = table[SAMPLE_ID].to_numpy()
    if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
        return table
    return table.take(pa.array(np.argsort(ids, kind="stable"))).replace_schema_metadata(
        table.schema.metadata
    )


def part_rows(table: pa.Table) -> int:
    """Rows per part so that one part decodes to about :data:`PART_BYTES`."""
    per_row = table.nbytes / max(1, table.num_rows)
    return max(_MIN_PART_ROWS, int(PART_BYTES // max(per_row, 1.0)))


def _encode(table: pa.Table, layout: RunLayout) -> tuple[dict, bytes]:
    """One part: its manifest entry and its Parquet bytes (small row groups: shard_read)."""
    ids = table[SAMPLE_ID]
    lo = int(pc.min(ids).as_py()) if table.num_rows else None
    hi = int(pc.max(ids).as_py()) if table.num_rows else None
    name = f"{lo or 0:020d}-{uuid.uuid4().hex[:8]}.parquet"
    entry = {"file": f"{layout.data_parts}/{name}", "rows": table.num_rows, "min": lo, "max": hi}
    return entry, table_bytes(table, row_group_rows(table))


def encode_parts(table: pa.Table, layout: RunLayout) -> list[tuple[dict, bytes]]:
    """``table`` (any order) as parts of :func:`part_rows` rows, in id order."""
    table = _sorted(table)
    step = part_rows(table)
    starts = range(0, table.num_rows, step) if table.num_rows else [0]
    return [_encode(table.slice(s, step), layout) for s in starts]


@dataclass
class PartsChange:
    """A new set of parts computed from ``base`` (nothing written yet): the parts kept, the
    new parts' entries and bytes, and the files they replace."""

    base: Manifest
    parts: list[dict]  # the new manifest's parts, in id order
    new: dict[str, bytes]  # file -> bytes, for the entries of ``parts`` not in ``base``
    replaced: list[str]  # files of ``base`` that the new manifest drops
    rows_removed: int = 0

    @property
    def rows(self) -> int:
        return sum(int(p["rows"]) for p in self.parts)


def without_rows(storage: Storage, layout: RunLayout, gone: np.ndarray) -> PartsChange:
    """The copy without the rows of ``gone`` (sorted unique int64): only the parts that can
    hold one are read, and only those that do are re-encoded. A legacy single file is read
    whole and split into parts."""
    man = read_manifest(storage, layout)
    if man is None:
        raise StorageError(f"run {layout.run_id} has no copy of its data under {storage.uri}")
    parts, new, replaced, removed = [], {}, [], 0
    value_set = pa.array(gone, type=pa.int64())
    for p in man.parts:
        # the id range first (no read), then the part's ids (kept in memory: parts never
        # change), so that the parts that once held a deleted row are not read again
        if not _may_hold(p, gone) or (
            man.generation > 0 and not np.isin(part_ids(storage, p["file"]), gone).any()
        ):
            parts.append(p)
            continue
        # on the calling thread only: a deletion's compaction is prepared on a niced thread
        # while the shard retrains, and Arrow's own pool would run at normal priority beside
        # it (+8 ms median, ~4%, on a 0.22 s retraining on 2 cores)
        table = _read_part(storage, p["file"], use_threads=False)
        hit = pc.is_in(table[SAMPLE_ID], value_set=value_set)
        n_hit = int(pc.sum(hit).as_py() or 0)
        if not n_hit and man.generation > 0:
            parts.append(p)
            continue
        kept = table.filter(pc.invert(hit)).replace_schema_metadata(table.schema.metadata)
        removed += n_hit
        replaced.append(p["file"])
        pieces = encode_parts(kept, layout) if man.generation == 0 else [_encode(kept, layout)]
        for entry, data in pieces:
            _remember(storage, entry["file"], _slice_ids(kept, entry))
            parts.append(entry)
            new[entry["file"]] = data
    return PartsChange(man, parts, new, replaced, removed)


def switch(storage: Storage, layout: RunLayout, change: PartsChange) -> int:
    """Write ``change``'s new parts, then the next generation's manifest (exclusively), then
    delete what it replaced and any old orphan; returns the new generation. Raises
    :class:`AlreadyExists` when another writer switched from the same base first (the new
    parts written here are then orphans, deleted by a later switch)."""
    names = list(change.new)
    for i, rel in enumerate(names):
        # one folder sync, after the last part: it covers every part renamed in before
        storage.write_bytes(rel, change.new[rel], sync_dir=i == len(names) - 1)
    gen = change.base.generation + 1
    doc = {"generation": gen, "parts": change.parts, "rows": change.rows, "written_at": time.time()}
    storage.write_json(_manifest_path(layout, gen), doc, exclusive=True)
    _delete_durably(storage, change.replaced)
    cleanup(storage, layout)
    return gen


def write_copy_table(storage: Storage, layout: RunLayout, table: pa.Table) -> int:
    """Replace the whole copy by ``table`` (a run's creation; tests), as a new generation."""
    for _ in range(_RETRIES):
        base = read_manifest(storage, layout) or Manifest(0, ())
        pieces = encode_parts(table, layout)
        change = PartsChange(
            base, [e for e, _ in pieces], {e["file"]: d for e, d in pieces}, base.files()
        )
        try:
            return switch(storage, layout, change)
        except AlreadyExists:
            continue
    raise StorageError(f"run {layout.run_id}: the copy kept changing under this write")


def _delete_durably(storage: Storage, rels: list[str]) -> None:
    """Delete files and, on a local disk, sync their folders (one sync a folder): a part
    that held deleted rows must not come back after a crash once its request is done."""
    for rel in rels:
        storage.delete(rel)
    if storage.local:
        for folder in {rel.rsplit("/", 1)[0] for rel in rels}:
            _fsync_dir(storage.full(folder))


def cleanup(storage: Storage, layout: RunLayout) -> None:
    """Delete what a switch leaves behind: the files of older manifests that the newest
    does not name (a crash between a switch and its deletions: done here at once), then
    those manifests; and part files no manifest names once older than ORPHAN_AGE_S (a
    crash before a switch, a lost race; younger ones may be a live writer's). Costs one
    listing of the manifests when there is nothing to do, plus one of the parts after a
    switch."""
    names = sorted(n for n in storage.listdir(layout.data_manifests) if _MANIFEST_RE.match(n))
    newest = read_manifest(storage, layout) if len(names) > 1 else None
    if newest is None:
        return
    live = set(newest.files())
    old = [f"{layout.data_manifests}/{n}" for n in names if int(n[:10]) < newest.generation]
    stale: list[str] = []
    for rel in old:
        try:
            files = [p["file"] for p in storage.read_json(rel)["parts"]]
        except (StorageError, ValueError, KeyError, TypeError):
            continue
        stale += [f for f in files if f not in live]
    _delete_durably(storage, [f for f in stale if storage.exists(f)])
    for rel in old:  # not synced: an old manifest that comes back after a crash is ignored
        storage.delete(rel)
    now_ns = time.time_ns()
    orphans = []
    for name in storage.listdir(layout.data_parts):
        rel = f"{layout.data_parts}/{name}"
        if rel in live or not _PART_RE.match(name):
            continue
        info = storage.fs.get_file_info(storage.full(rel))
        if info.mtime_ns is None or now_ns - info.mtime_ns > ORPHAN_AGE_S * 1e9:
            orphans.append(rel)
    _delete_durably(storage, orphans)


def copy_files(storage: Storage, layout: RunLayout) -> list[str]:
    """The files that hold the copy now (its parts, or the legacy file)."""
    man = read_manifest(storage, layout)
    return man.files() if man is not None else []
