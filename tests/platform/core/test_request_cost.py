"""The fixed cost of one request, guarded by counts (never by timings): the data copy's
compaction is prepared while the shards retrain and reads and rewrites only the parts that
hold the removed rows, a prepared compaction is never written over a copy that changed, and
what one request writes and syncs stays bounded."""

from __future__ import annotations

import os

import numpy as np

from ray_unlearn.platform.core import copy_parts
from ray_unlearn.platform.core.compaction import PreparedCompaction, compact, read_copy
from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
from ray_unlearn.platform.core.plan import TEST


def _owner(ctx, i):
    return str(np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])[i])


def _copy_ids(ctx):
    return read_copy(ctx.storage, ctx.layout)["sample_id"].to_numpy()


def _in_small_parts(ctx, monkeypatch):
    """Rewrite the tiny run's copy (one part at its size) as parts of 16 rows."""
    monkeypatch.setattr(copy_parts, "PART_BYTES", 1)
    monkeypatch.setattr(copy_parts, "_MIN_PART_ROWS", 16)
    copy_parts.write_copy_table(ctx.storage, ctx.layout, read_copy(ctx.storage, ctx.layout))
    return copy_parts.read_manifest(ctx.storage, ctx.layout)


def test_the_copy_is_compacted_once_prepared_during_retraining(tiny_run, monkeypatch):
    ctx = tiny_run
    engine = UnlearningEngine(ctx, LocalShards(ctx))
    engine.forget(owner_id=_owner(ctx, 0))  # shards loaded, one request done
    reads, threads = [], []
    real = copy_parts.without_rows

    def counted(storage, layout, gone):
        import threading

        threads.append(threading.current_thread().name)
        reads.append(len(gone))
        return real(storage, layout, gone)

    monkeypatch.setattr(copy_parts, "without_rows", counted)
    owner = _owner(ctx, 1)
    ids = ctx.plan.samples_of_owner(owner)
    rec = engine.forget(owner_id=owner)
    assert rec.state.value == "done"
    assert threads == ["prepare-compaction"], threads  # once, not on the request's path
    assert not np.isin(ids, _copy_ids(ctx)).any()
    done = ctx.deletion_log.deleted_sample_ids()
    assert reads == [len(done)]
    assert set(_copy_ids(ctx)) == set(ctx.plan.sample_ids) - done
    stats = ctx.storage.read_json(ctx.layout.data_compaction)
    assert stats["rows_removed_total"] == len(done)
    assert stats["rows"] == len(ctx.plan.sample_ids) - len(done)


def test_a_compaction_reads_and_rewrites_only_the_parts_holding_the_rows(tiny_run, monkeypatch):
    ctx = tiny_run
    man = _in_small_parts(ctx, monkeypatch)
    assert len(man.parts) >= 20
    engine = UnlearningEngine(ctx, LocalShards(ctx))
    engine.forget(owner_id=_owner(ctx, 0))  # shards loaded, one request done
    owner = _owner(ctx, 1)
    ids = ctx.plan.samples_of_owner(owner)
    before = copy_parts.read_manifest(ctx.storage, ctx.layout)
    holding = {
        p["file"]
        for p in before.parts
        if p["rows"] and np.isin(ids, range(p["min"], p["max"] + 1)).any()
    }
    reads, writes = [], []
    real_read, real_write = copy_parts._read_part, type(ctx.storage).write_bytes

    def read_part(storage, rel, columns=None, **kw):
        if columns is None:  # a whole part (an id column alone is read once per process)
            reads.append(rel)
        return real_read(storage, rel, columns, **kw)

    def write(self, rel, data, **kw):
        writes.append(rel)
        return real_write(self, rel, data, **kw)

    monkeypatch.setattr(copy_parts, "_read_part", read_part)
    monkeypatch.setattr(type(ctx.storage), "write_bytes", write)
    assert engine.forget(owner_id=owner).state.value == "done"
    monkeypatch.undo()
    assert set(reads) == holding  # each once, and no other part
    assert len(reads) == len(holding) < len(before.parts)
    new_parts = [w for w in writes if w.startswith(ctx.layout.data_parts + "/")]
    assert len(new_parts) == len(holding)
    after = copy_parts.read_manifest(ctx.storage, ctx.layout)
    assert after.generation == before.generation + 1 and len(after.parts) == len(before.parts)
    for old in holding:  # the replaced parts are gone from the store, not only unlisted
        assert not ctx.storage.exists(old)
    done = ctx.deletion_log.deleted_sample_ids()
    assert set(_copy_ids(ctx)) == set(ctx.plan.sample_ids) - done
    assert sorted(_copy_ids(ctx)) == list(_copy_ids(ctx))  # parts stay in id order


def test_a_prepared_compaction_is_not_written_over_a_copy_that_changed(tiny_run):
    ctx = tiny_run
    a, b = ctx.plan.samples_of_owner(_owner(ctx, 2)), ctx.plan.samples_of_owner(_owner(ctx, 3))
    prepared = PreparedCompaction(ctx, a)
    prepared.result(ctx.storage, ctx.layout, np.unique(a))  # wait for it
    # another writer rewrites the copy meanwhile (without b's rows)
    table = read_copy(ctx.storage, ctx.layout)
    keep = ~np.isin(table["sample_id"].to_numpy(), b)
    copy_parts.write_copy_table(ctx.storage, ctx.layout, table.filter(keep))
    out = compact(ctx, a, prepared)
    assert out["rows_removed"] == len(a)
    left = _copy_ids(ctx)
    assert not np.isin(a, left).any() and not np.isin(b, left).any()  # b's removal kept


def test_a_prepared_compaction_for_other_ids_is_not_used(tiny_run, monkeypatch):
    ctx = tiny_run
    a, b = ctx.plan.samples_of_owner(_owner(ctx, 2)), ctx.plan.samples_of_owner(_owner(ctx, 3))
    prepared = PreparedCompaction(ctx, a)
    out = compact(ctx, np.concatenate([a, b]), prepared)
    assert out["rows_removed"] == len(a) + len(b)
    assert not np.isin(np.concatenate([a, b]), _copy_ids(ctx)).any()


def test_one_request_writes_and_syncs_a_bounded_number_of_files(tiny_run, monkeypatch):
    """Per request: the log (request, two transitions, each with its feed marker, fence ack),
    the lease, the intent (twice), the registry (generation + copy), per new version weights
    + ids + manifest, per retired version its manifest, the data copy's rewritten parts (one
    in this run) with its manifest and stats: a fixed
    budget plus one per version (a regression that writes or syncs per sample, per shard or
    per logged request shows here)."""
    ctx = tiny_run
    engine = UnlearningEngine(ctx, LocalShards(ctx))
    engine.forget(owner_id=_owner(ctx, 0))
    writes, fsyncs, folders = [], [], []
    storage_type = type(ctx.storage)
    real_write, real_touch = storage_type.write_bytes, storage_type.touch
    real_fsync, real_mkdir = os.fsync, os.mkdir

    def write(self, rel, data, **kw):
        writes.append(rel)
        return real_write(self, rel, data, **kw)

    def touch(self, rel):
        writes.append(rel)
        return real_touch(self, rel)

    def fsync(fd):
        fsyncs.append(fd)
        return real_fsync(fd)

    def mkdir(path, *a, **kw):
        folders.append(path)
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(storage_type, "write_bytes", write)
    monkeypatch.setattr(storage_type, "touch", touch)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "mkdir", mkdir)
    rec = engine.forget(owner_id=_owner(ctx, 1))
    d = rec.details
    created, retired = len(d["versions_created"]), len(d["versions_retired"])
    assert created == retired >= 1
    per_version = 3 + 1  # weights, ids, manifest when created; the manifest when retired
    # request, ack, 2 events + 3 feed markers, lease x2, intent x2, registry generation +
    # copy, the copy's part + manifest + stats: 16 today; a little room for the log's own
    # bookkeeping (deleting the replaced part syncs its folder once more: the room below)
    fixed = 18
    assert len(writes) <= fixed + per_version * created, writes
    # each write syncs the file and its folder (a feed marker is empty: its folder only), a
    # new version's three files share one folder sync (its manifest's): 2 fewer per created
    # version; a new folder (the request's, each version's) syncs its parent once
    budget = 2 * len(writes) - 2 * created + len(folders)
    assert len(fsyncs) <= budget, (len(fsyncs), len(writes), len(folders), created)
    # the request's folder, each new version's, and the feed's time folder when the request
    # crosses into a new one: never a folder per logged request or per sample
    assert len(folders) <= 2 + created, folders
