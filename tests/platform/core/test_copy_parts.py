"""The run's copy in part files: a compaction switches whole sets of parts, a lost race is
redone on the winner's parts, a crash between the switch and the deletions leaves nothing
behind after the next compaction, a reader whose part vanished reads the newest set, and a
run made before parts (one file) is read and converted by its first compaction."""

from __future__ import annotations

import numpy as np
import pytest

from ray_unlearn.platform.core import copy_parts
from ray_unlearn.platform.core.compaction import compact, has_copy, read_copy, read_copy_rows
from ray_unlearn.platform.core.data import SAMPLE_ID
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.residue import scan_residue
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.core.storage import AlreadyExists
from tests.conftest import tiny_config


def _owner_ids(ctx, i):
    owner = np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])[i]
    return ctx.plan.samples_of_owner(str(owner))


def _ids(ctx):
    return read_copy(ctx.storage, ctx.layout)[SAMPLE_ID].to_numpy()


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A run (untrained: compaction needs none) whose copy is in parts of 16 rows."""
    monkeypatch.setattr(copy_parts, "PART_BYTES", 1)
    monkeypatch.setattr(copy_parts, "_MIN_PART_ROWS", 16)
    return create_run(tiny_config(tmp_path, "data.compact=manual"))


def _log_done(ctx, ids):
    rec, _ = ctx.deletion_log.submit(list(map(int, ids)))
    ctx.deletion_log.transition(rec.request.request_id, "executing")
    ctx.deletion_log.transition(rec.request.request_id, "done")


def test_parts_are_disjoint_id_ranges_and_reads_open_only_those_that_may_hold(run, monkeypatch):
    man = copy_parts.read_manifest(run.storage, run.layout)
    assert len(man.parts) > 50 and man.rows == len(run.plan.sample_ids)
    bounds = [(p["min"], p["max"]) for p in man.parts]
    assert all(a[1] < b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    opened = []
    fs = run.storage.fs
    real = fs.open_input_file

    class Spy:
        def __getattr__(self, name):
            return getattr(fs, name)

        def open_input_file(self, path):
            opened.append(path)
            return real(path)

    monkeypatch.setattr(run.storage, "fs", Spy())
    wanted = run.plan.sample_ids[[3, 4, 5]]
    got = read_copy_rows(run.storage, run.layout, wanted)
    assert got[SAMPLE_ID].to_pylist() == sorted(wanted.tolist())
    assert len(opened) == 1  # three neighbouring ids: one part


def test_a_lost_race_is_redone_on_the_winners_parts(run):
    a, b = _owner_ids(run, 0), _owner_ids(run, 1)
    stale = copy_parts.without_rows(run.storage, run.layout, np.unique(a))
    _log_done(run, b)
    assert compact(run)["rows_removed"] == len(b)  # the other writer switches first
    with pytest.raises(AlreadyExists):
        copy_parts.switch(run.storage, run.layout, stale)
    _log_done(run, a)
    assert compact(run)["rows_removed"] == len(a)
    left = _ids(run)
    assert not np.isin(np.concatenate([a, b]), left).any()
    assert len(left) == len(run.plan.sample_ids) - len(a) - len(b)


def test_a_crash_after_the_switch_leaves_nothing_after_the_next_compaction(run, monkeypatch):
    a = _owner_ids(run, 0)
    _log_done(run, a)
    replaced = []

    def crash(storage, rels):
        replaced.extend(rels)
        raise KeyboardInterrupt("kill -9 between the switch and the deletions")

    monkeypatch.setattr(copy_parts, "_delete_durably", crash)
    with pytest.raises(KeyboardInterrupt):
        compact(run)
    monkeypatch.undo()
    assert replaced and all(run.storage.exists(f) for f in replaced)  # old parts still there
    assert not np.isin(a, _ids(run)).any()  # the switch happened: readers see the new set
    assert not scan_residue(run)["clean"]  # the replaced parts hold the rows
    assert compact(run)["rows_removed"] == 0  # nothing to remove: it cleans up instead
    assert not any(run.storage.exists(f) for f in replaced)
    assert scan_residue(run)["clean"]


def test_a_reader_whose_part_vanished_reads_the_newest_set(run, monkeypatch):
    old = copy_parts.read_manifest(run.storage, run.layout)
    a = _owner_ids(run, 0)
    _log_done(run, a)
    compact(run)  # replaces (deletes) the parts that held a
    calls = []
    real = copy_parts.read_manifest

    def stale_first(storage, layout):
        calls.append(1)
        return old if len(calls) == 1 else real(storage, layout)

    monkeypatch.setattr(copy_parts, "read_manifest", stale_first)
    ids = _ids(run)
    assert len(calls) == 2 and not np.isin(a, ids).any()
    assert len(ids) == len(run.plan.sample_ids) - len(a)


def test_a_run_made_before_parts_is_read_and_converted_by_its_first_compaction(run):
    table = read_copy(run.storage, run.layout)
    for f in copy_parts.copy_files(run.storage, run.layout):
        run.storage.delete(f)
    run.storage.delete(run.layout.data_manifests)
    run.storage.write_table(run.layout.data_copy, table)  # the single file of old runs
    assert has_copy(run.storage, run.layout)
    assert copy_parts.read_manifest(run.storage, run.layout).generation == 0
    assert np.array_equal(_ids(run), table[SAMPLE_ID].to_numpy())
    wanted = run.plan.sample_ids[[0, 7]]
    assert read_copy_rows(run.storage, run.layout, wanted)[SAMPLE_ID].to_pylist() == sorted(
        wanted.tolist()
    )
    a = _owner_ids(run, 0)
    _log_done(run, a)
    assert compact(run)["rows_removed"] == len(a)
    man = copy_parts.read_manifest(run.storage, run.layout)
    assert man.generation == 1 and len(man.parts) > 50
    assert not run.storage.exists(run.layout.data_copy)
    assert len(_ids(run)) == len(table) - len(a)
