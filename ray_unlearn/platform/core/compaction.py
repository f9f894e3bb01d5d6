"""The run's own copy of its data, compacted without deleted rows, and the scrub that runs
when a deletion is done.

A run reads its records from its own copy, ``runs/<id>/data/parts/`` (part files under a
manifest: platform/core/copy_parts.py), written when the run is created, never from the
configured source again: the source may be
the shared bundled cache (``datasets/``, used by other runs) or a user's Parquet, neither of
which the platform may rewrite. Deleting a person's rows then means rewriting the run's copy
without them (:func:`compact`: only the parts that hold them are rewritten): immediately when the deletion is done (``data.compact:
on_delete``, the default) or on ``ray-unlearn compact`` (``manual``). The source outside the
run is reported, never touched (:func:`outside_sources`): erasing it is the user's job.

:func:`scrub_deleted` is what "done" adds after the old versions are retired: per-sample
reports lose the deleted rows, the copy is compacted (on_delete), Ray Train's transport
checkpoints go. Readers of ``ctx.records`` keep working after a compaction because the plan's
deleted ids are filtered out by :meth:`RunContext.present` (they are gone from the copy).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_unlearn.platform.core import copy_parts
from ray_unlearn.platform.core.data import (
    BUNDLED,
    SAMPLE_ID,
    DataConfig,
    Records,
    bundled_name,
    records_from_table,
)
from ray_unlearn.platform.core.storage import (
    AlreadyExists,
    RunLayout,
    Storage,
    StorageError,
    dataset_path,
)

if TYPE_CHECKING:
    from ray_unlearn.platform.core.run import RunContext

log = logging.getLogger(__name__)


def write_copy(storage: Storage, layout: RunLayout, records: Records) -> None:
    """The run's copy of ``records``, as part files (platform/core/copy_parts.py)."""
    copy_parts.write_copy_table(storage, layout, records.to_table())


def has_copy(storage: Storage, layout: RunLayout) -> bool:
    return bool(storage.listdir(layout.data_manifests)) or storage.exists(layout.data_copy)


def copy_name(storage: Storage, layout: RunLayout) -> str:
    """Where the copy lives (its parts' folder, or a run's single file made before parts)."""
    return layout.data_parts if storage.listdir(layout.data_manifests) else layout.data_copy


def load_copy(storage: Storage, layout: RunLayout, cfg: DataConfig) -> Records:
    table = copy_parts.read_copy(storage, layout)
    source = f"{storage.uri.rstrip('/')}/{copy_name(storage, layout)}"
    return records_from_table(table, source, cfg)


def read_copy_rows(storage: Storage, layout: RunLayout, sample_ids: np.ndarray) -> pa.Table:
    """The rows of ``sample_ids`` still in the run's copy (validated by the caller): only
    the parts whose id range can hold one are read, a row group at a time, so a shard's
    process never holds the other shards' rows."""
    return copy_parts.read_copy_rows(storage, layout, sample_ids)


def read_copy(storage: Storage, layout: RunLayout, columns=None) -> pa.Table:
    """The whole copy as one table (residue scans, tests)."""
    return copy_parts.read_copy(storage, layout, columns)


def _ids(ids: Iterable[int]) -> np.ndarray:
    return np.fromiter((int(i) for i in ids), dtype=np.int64)


def _generation(storage: Storage, layout: RunLayout) -> int | None:
    man = copy_parts.read_manifest(storage, layout)
    return None if man is None else man.generation


class PreparedCompaction:
    """:func:`compact`'s reading and re-encoding of the parts holding ``ids``, run in a
    background thread while the shards retrain; :func:`compact` given it only writes,
    after the registry switch as before. Nothing is written here: an execution that fails
    drops it. It is used only for exactly the ids :func:`compact` removes and only over
    the manifest it read (same generation); otherwise :func:`compact` does the work again.
    (Since the copy is in parts this is small: the parts holding one owner's rows, ~50 ms
    of CPU for 5 parts of 100k rows x 600 features where the whole copy took ~1.6 s.)"""

    def __init__(self, ctx: RunContext, ids: Iterable[int]):
        self.gone = np.unique(_ids(ids))
        self._out: copy_parts.PartsChange | None = None
        self._thread = threading.Thread(
            target=self._run, args=(ctx.storage, ctx.layout), name="prepare-compaction", daemon=True
        )
        self._thread.start()

    def _run(self, storage: Storage, layout: RunLayout) -> None:
        try:
            # Lowest CPU priority (Linux: per thread): on spare cores this is free, and where
            # the retraining's torch threads fill every core it waits for them rather than
            # preempt them (an OpenMP team with one thread descheduled stalls at each
            # barrier: measured 3x slower Adam steps on 2 cores).
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):  # not Linux, or not allowed: run as it is
            pass
        try:
            if has_copy(storage, layout):
                self._out = copy_parts.without_rows(storage, layout, self.gone)
        except Exception:  # noqa: BLE001  (compact() then reads it again, and reports)
            log.warning("preparing the compaction of the run's copy failed", exc_info=True)

    def close(self) -> None:
        """Wait for the thread (an execution that failed drops the result)."""
        self._thread.join()

    def result(self, storage: Storage, layout: RunLayout, gone: np.ndarray):
        self._thread.join()
        out = self._out
        if out is None or not np.array_equal(self.gone, gone):
            return None
        return out if out.base.generation == _generation(storage, layout) else None


def prepare_compaction(ctx: RunContext, ids: Iterable[int]) -> PreparedCompaction | None:
    """Start preparing the compaction a ``done`` of ``ids`` will do (``data.compact:
    on_delete``); None when the run compacts manually."""
    if ctx.config.data.compact != "on_delete":
        return None
    return PreparedCompaction(ctx, ids)


def compact(
    ctx: RunContext, removed_ids: Iterable[int] = (), prepared: PreparedCompaction | None = None
) -> dict[str, Any]:
    """Rewrite the parts of the run's copy that hold a row whose deletion is done or is in
    ``removed_ids`` (the requests being finished now), without those rows. Atomic (readers
    see the old set of parts or the new one); idempotent; another writer switching first
    makes it start again from that writer's parts. ``prepared``: the same work done ahead
    (:func:`prepare_compaction`). Returns ``{"rows_removed", "rows", "copy"}``."""
    storage, layout = ctx.storage, ctx.layout
    if not has_copy(storage, layout):
        return {"rows_removed": 0, "rows": None, "copy": None}
    gone = np.unique(_ids(ctx.deletion_log.deleted_sample_ids() | {int(i) for i in removed_ids}))
    change = prepared.result(storage, layout, gone) if prepared is not None else None
    for _ in range(5):
        if change is None:
            try:
                change = copy_parts.without_rows(storage, layout, gone)
            except FileNotFoundError:  # a part deleted by another writer's switch: redo
                continue
        if not change.rows_removed:
            copy_parts.cleanup(storage, layout)  # what a crash after a switch left, if any
            break
        try:
            copy_parts.switch(storage, layout, change)
        except AlreadyExists:  # another compaction switched first: redo on its parts
            change = None
            continue
        prior = (
            storage.read_json(layout.data_compaction)
            if storage.exists(layout.data_compaction)
            else {}
        )
        storage.write_json(
            layout.data_compaction,
            {
                "compacted_at": time.time(),
                "rows": change.rows,
                "rows_removed_total": int(prior.get("rows_removed_total", 0)) + change.rows_removed,
                "parts_rewritten": len(change.new),
            },
        )
        ctx.__dict__.pop("records", None)  # the next read sees the compacted copy
        break
    else:
        raise StorageError(f"run {ctx.run_id}: the copy kept changing under this compaction")
    return {
        "rows_removed": change.rows_removed,
        "rows": change.rows,
        "copy": copy_name(storage, layout),
    }


def waiting_for_compaction(ctx: RunContext) -> dict[str, Any]:
    """What the run's copy still holds of done deletions (``manual`` mode, or a crash)."""
    layout = ctx.layout
    mode = ctx.config.data.compact
    if not has_copy(ctx.storage, layout):
        return {"copy": None, "mode": mode, "rows_waiting": 0}
    ids = read_copy(ctx.storage, layout, [SAMPLE_ID]).column(SAMPLE_ID).to_numpy()
    deleted = _ids(ctx.deletion_log.deleted_sample_ids())
    return {
        "copy": copy_name(ctx.storage, layout),
        "mode": mode,
        "rows_waiting": int(np.isin(ids, deleted).sum()),
    }


def outside_sources(ctx: RunContext) -> list[dict[str, Any]]:
    """The data source outside the run (the shared bundled cache, a user's Parquet) with the
    number of done-deleted rows it still holds: the user's to erase; never touched here."""
    cfg = ctx.config.data
    deleted = _ids(ctx.deletion_log.deleted_sample_ids())
    if cfg.source in BUNDLED:
        rel = dataset_path(bundled_name(cfg))
        if not ctx.storage.exists(rel):
            return []
        path = ctx.storage.full(rel)
        ids = pq.read_table(ctx.storage.fs.open_input_file(path), columns=[SAMPLE_ID])
    else:
        src = cfg.source
        fs, path = (
            pafs.FileSystem.from_uri(src)
            if "://" in src
            else (pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(src)))
        )
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return [{"source": src, "path": path, "deleted_rows": 0, "exists": False}]
        ids = pq.read_table(path, filesystem=fs, columns=[SAMPLE_ID])
    held = np.isin(ids.column(SAMPLE_ID).to_numpy(), deleted)
    return [
        {
            "source": cfg.source,
            "path": path,
            "exists": True,
            "deleted_rows": int(held.sum()),
            "note": "outside the run: the user's to erase (ray-unlearn never rewrites it)",
        }
    ]


# -- per-sample reports ---------------------------------------------------------------------


def _files_under(storage: Storage, rel: str) -> list[str]:
    sel = pafs.FileSelector(storage.full(rel), allow_not_found=True, recursive=True)
    base = storage.full("")
    return sorted(
        i.path[len(base) :].lstrip("/")
        for i in storage.fs.get_file_info(sel)
        if i.type == pafs.FileType.File
    )


def scrub_reports(ctx: RunContext, sample_ids: Iterable[int]) -> int:
    """Rewrite every Parquet report under ``runs/<id>/reports`` that has a ``sample_id``
    column (memorization scores, any per-sample table) without the rows of ``sample_ids``.
    Returns the rows removed."""
    gone = pa.array(_ids(sample_ids), type=pa.int64())
    removed = 0
    for rel in _files_under(ctx.storage, ctx.layout.reports):
        if not rel.endswith(".parquet"):
            continue
        table = ctx.storage.read_table(rel)
        if SAMPLE_ID not in table.column_names:
            continue
        hit = pc.is_in(table[SAMPLE_ID], value_set=gone)
        n = int(pc.sum(hit).as_py() or 0)
        if n:
            kept = table.filter(pc.invert(hit))
            ctx.storage.write_table(rel, kept.replace_schema_metadata(table.schema.metadata))
            removed += n
    return removed


def scrub_deleted(
    ctx: RunContext, sample_ids: Iterable[int], prepared: PreparedCompaction | None = None
) -> dict[str, Any]:
    """Everything a deletion of ``sample_ids`` must leave behind once its models are
    retired, before the requests are marked done: per-sample reports, the run's data copy
    (``data.compact: on_delete``) and Ray Train's transport checkpoints (weights of rows that
    may now be deleted; the platform's store is the record). ``prepared``: the copy's
    compaction prepared ahead (:func:`prepare_compaction`)."""
    ids = _ids(sample_ids)
    out: dict[str, Any] = {"report_rows_removed": scrub_reports(ctx, ids)}
    if ctx.config.data.compact == "on_delete":
        out["data_rows_removed"] = compact(ctx, ids, prepared)["rows_removed"]
    if ctx.storage.exists(ctx.layout.train_transport):
        ctx.storage.delete(ctx.layout.train_transport)
        out["train_transport_deleted"] = True
    return out
