"""The fixed cost of one request, guarded by counts (never by timings): the data copy's
compaction is prepared while the shards retrain and the copy is read once per request, a
prepared compaction is never written over a copy that changed, and what one request writes
and syncs stays bounded."""

from __future__ import annotations

import os

import numpy as np

from ray_unlearn.platform.core import compaction
from ray_unlearn.platform.core.compaction import PreparedCompaction, compact
from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
from ray_unlearn.platform.core.plan import TEST


def _owner(ctx, i):
    return str(np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])[i])


def _copy_ids(ctx):
    return ctx.storage.read_table(ctx.layout.data_copy)["sample_id"].to_numpy()


def test_the_copy_is_compacted_once_prepared_during_retraining(tiny_run, monkeypatch):
    ctx = tiny_run
    engine = UnlearningEngine(ctx, LocalShards(ctx))
    engine.forget(owner_id=_owner(ctx, 0))  # shards loaded, one request done
    reads, threads = [], []
    real = compaction._without

    def counted(storage, layout, gone, last=None):
        import threading

        threads.append(threading.current_thread().name)
        reads.append(len(gone))
        return real(storage, layout, gone, last)

    monkeypatch.setattr(compaction, "_without", counted)
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


def test_a_long_lived_executor_does_not_read_back_the_copy_it_wrote(tiny_run, monkeypatch):
    ctx = tiny_run
    engine = UnlearningEngine(ctx, LocalShards(ctx))
    engine.forget(owner_id=_owner(ctx, 0))  # writes the copy: this process keeps its table
    reads = []
    real = type(ctx.storage).read_table

    def read_table(self, rel):
        reads.append(rel)
        return real(self, rel)

    monkeypatch.setattr(type(ctx.storage), "read_table", read_table)
    engine.forget(owner_id=_owner(ctx, 1))
    assert ctx.layout.data_copy not in reads
    monkeypatch.undo()
    done = ctx.deletion_log.deleted_sample_ids()
    assert set(_copy_ids(ctx)) == set(ctx.plan.sample_ids) - done


def test_a_prepared_compaction_is_not_written_over_a_copy_that_changed(tiny_run):
    ctx = tiny_run
    a, b = ctx.plan.samples_of_owner(_owner(ctx, 2)), ctx.plan.samples_of_owner(_owner(ctx, 3))
    prepared = PreparedCompaction(ctx, a)
    prepared.result(ctx.storage, ctx.layout, np.unique(a))  # wait for it
    # another writer rewrites the copy meanwhile (without b's rows)
    table = ctx.storage.read_table(ctx.layout.data_copy)
    keep = ~np.isin(table["sample_id"].to_numpy(), b)
    ctx.storage.write_table(ctx.layout.data_copy, table.filter(keep))
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
    + ids + manifest, per retired version its manifest, the data copy and its stats: a fixed
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
    # copy, data copy + its stats: 15 today; a little room for the log's own bookkeeping
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
