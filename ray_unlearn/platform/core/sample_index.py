"""A stored index of which live model versions hold which sample ids, for audits.

The truth is each version's ``samples.parquet`` (the exact ids it was trained on). Reading
every live version's list on each audit costs O(samples x slices); this index answers "which
live versions hold sample s" by binary search instead. It is kept per *group* of versions that
change together (one shard's live chain; the shared versions), because a deletion changes one
shard's chain and only that group is rebuilt::

    runs/<id>/index/samples/<sha256(versions)[:16]>.parquet
        sample_id (sorted int64), version (int32 code into the ``versions`` metadata)

A group's file is named by the digest of its version ids, and versions are never changed
once saved, so a stored group is valid for as long as those versions are; writers that race
write the same bytes. A process keeps the groups it has read, so an audit after the first
costs O(shards x log n) in memory plus one small file per changed chain.

The index holds sample ids, so it must not outlive its versions: retiring a version drops
every group that names it (:func:`drop_groups_with`), and building the groups of the live
chains drops any other group (a crash between the two leaves a stale group, which the
residue scan reports until the next audit or retirement removes it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_unlearn.platform.core.storage import StorageError


@dataclass(frozen=True)
class IndexGroup:
    versions: tuple[str, ...]
    ids: np.ndarray  # (n,) int64, sorted
    codes: np.ndarray  # (n,) int32: index into ``versions`` of the version holding ids[i]

    def holding(self, wanted: np.ndarray) -> dict[str, list[int]]:
        """version -> the ``wanted`` ids it holds (``wanted`` sorted unique int64)."""
        lo = np.searchsorted(self.ids, wanted, side="left")
        hi = np.searchsorted(self.ids, wanted, side="right")
        out: dict[str, list[int]] = {}
        for w, a, b in zip(wanted.tolist(), lo.tolist(), hi.tolist(), strict=True):
            for c in self.codes[a:b].tolist():
                out.setdefault(self.versions[c], []).append(w)
        return out


def index_dir(layout) -> str:
    return f"{layout.root}/index/samples"


def group_path(layout, versions: tuple[str, ...]) -> str:
    digest = hashlib.sha256("\n".join(versions).encode()).hexdigest()[:16]
    return f"{index_dir(layout)}/{digest}.parquet"


def build_group(versions: tuple[str, ...], sample_ids_of) -> IndexGroup:
    """The group from each version's own sample list (``sample_ids_of(vid)``)."""
    parts = [np.asarray(sample_ids_of(v), dtype=np.int64) for v in versions]
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    codes = (
        np.concatenate([np.full(len(p), i, dtype=np.int32) for i, p in enumerate(parts)])
        if parts
        else np.zeros(0, np.int32)
    )
    order = np.argsort(ids, kind="stable")
    return IndexGroup(versions, ids[order], codes[order])


def to_table(group: IndexGroup) -> pa.Table:
    table = pa.table({"sample_id": group.ids, "version": group.codes})
    return table.replace_schema_metadata({"versions": json.dumps(list(group.versions))})


def from_table(table: pa.Table, versions: tuple[str, ...]) -> IndexGroup:
    stored = tuple(json.loads(table.schema.metadata[b"versions"]))
    if stored != versions:
        raise ValueError(f"index file is for versions {stored}, not {versions}")
    return IndexGroup(
        versions,
        table["sample_id"].to_numpy().astype(np.int64, copy=False),
        table["version"].to_numpy().astype(np.int32, copy=False),
    )


# Rows per row group of a stored group. Ids are sorted, so row groups are disjoint id ranges
# and a process that has not read a group yet (a new audit process) reads only the row
# groups whose range may hold an id it asks about: at 1M samples (16 chains of 156k rows)
# reading whole groups was 65 of a cold audit's ~100 ms.
ROW_GROUP_ROWS = 8192


class StoredGroup:
    """A stored group read on demand, a row group at a time (its footer at once); the row
    groups read are kept, so the answers are :class:`IndexGroup`'s at the cost of the row
    groups the questions touch."""

    def __init__(self, storage, path: str, versions: tuple[str, ...]):
        self.versions, self._storage, self._path = versions, storage, path
        with storage.fs.open_input_file(storage.full(path)) as f:
            pf = pq.ParquetFile(f)
            stored = tuple(json.loads((pf.schema_arrow.metadata or {})[b"versions"]))
            if stored != versions:
                raise ValueError(f"index file is for versions {stored}, not {versions}")
            md = pf.metadata
            col = pf.schema_arrow.get_field_index("sample_id")
            self._ranges = []
            for g in range(md.num_row_groups):
                st = md.row_group(g).column(col).statistics
                ok = st is not None and st.has_min_max
                self._ranges.append((int(st.min), int(st.max)) if ok else None)
        self._read: dict[int, IndexGroup] = {}

    def _part(self, wanted: np.ndarray, g: int) -> np.ndarray:
        rng = self._ranges[g]
        if rng is None:
            return wanted
        lo, hi = np.searchsorted(wanted, rng[0], "left"), np.searchsorted(wanted, rng[1], "right")
        return wanted[lo:hi]

    def holding(self, wanted: np.ndarray) -> dict[str, list[int]]:
        """version -> the ``wanted`` ids it holds (``wanted`` sorted unique int64)."""
        asked = {g: w for g in range(len(self._ranges)) if len(w := self._part(wanted, g))}
        missing = [g for g in asked if g not in self._read]
        if missing:
            with self._storage.fs.open_input_file(self._storage.full(self._path)) as f:
                pf = pq.ParquetFile(f)
                for g in missing:
                    t = pf.read_row_group(g, columns=["sample_id", "version"])
                    self._read[g] = IndexGroup(
                        self.versions,
                        t["sample_id"].to_numpy().astype(np.int64, copy=False),
                        t["version"].to_numpy().astype(np.int32, copy=False),
                    )
        out: dict[str, list[int]] = {}
        for g in sorted(asked):  # id order: each version's hits come out sorted
            for vid, hits in self._read[g].holding(asked[g]).items():
                out.setdefault(vid, []).extend(hits)
        return out


def load_or_build(store, versions: tuple[str, ...]) -> IndexGroup | StoredGroup:
    """The stored group (read on demand), or build it from the versions' sample lists and
    store it."""
    path = group_path(store.layout, versions)
    try:
        return StoredGroup(store.storage, path, versions)
    except (StorageError, ValueError, KeyError, TypeError, OSError, pa.ArrowException):
        pass  # absent (first audit since the chain changed) or unreadable: rebuild
    group = build_group(versions, store.sample_ids)
    store.storage.write_table(path, to_table(group), row_group_size=ROW_GROUP_ROWS)
    return group


def _stored_versions(storage, rel: str) -> tuple[str, ...] | None:
    try:
        with storage.fs.open_input_file(storage.full(rel)) as f:
            meta = pq.read_schema(f).metadata or {}
        return tuple(json.loads(meta[b"versions"]))
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


def drop_groups_with(store, vids) -> int:
    """Delete every stored group that names one of ``vids`` (or cannot be read); returns
    how many. Reads only the files' footers."""
    gone = set(vids)
    folder = index_dir(store.layout)
    dropped = 0
    for name in store.storage.listdir(folder):
        rel = f"{folder}/{name}"
        versions = _stored_versions(store.storage, rel)
        if versions is None or gone.intersection(versions):
            store.storage.delete(rel)
            dropped += 1
    return dropped


def drop_groups_except(store, keep: set[str]) -> None:
    """Delete every stored group whose file is not in ``keep`` (paths)."""
    folder = index_dir(store.layout)
    for name in store.storage.listdir(folder):
        if f"{folder}/{name}" not in keep and not name.startswith(".tmp-"):
            store.storage.delete(f"{folder}/{name}")
