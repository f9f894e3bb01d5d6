"""No residue after a deletion is done: the run's data copy is compacted, per-sample reports
lose the rows, and an independent scan of every file under the run finds nothing (and finds
what is planted)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ray_unlearn.platform.core.compaction import (
    compact,
    outside_sources,
    read_copy,
    waiting_for_compaction,
)
from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.residue import scan_residue
from ray_unlearn.platform.core.run import create_run, open_run
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.eval.mia import eval_sets
from ray_unlearn.platform.methods.rum.memorization import load_scores, save_scores
from tests.conftest import tiny_config


def _owner(ctx, i):
    return str(np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])[i])


def _forget(ctx, owner):
    return UnlearningEngine(ctx, LocalShards(ctx)).forget(owner_id=owner)


def _copy_ids(ctx):
    return read_copy(ctx.storage, ctx.layout)["sample_id"].to_numpy()


def test_a_run_reads_its_own_copy_and_a_deletion_compacts_it(tiny_run):
    ctx = tiny_run
    assert set(_copy_ids(ctx)) == set(ctx.plan.sample_ids)
    train = ctx.split_records("train")
    save_scores(ctx, "confidence", train.sample_ids, np.arange(len(train), dtype=float), 0.1)
    owner = _owner(ctx, 2)
    ids = ctx.plan.samples_of_owner(owner)

    _forget(ctx, owner)

    assert not np.isin(ids, _copy_ids(ctx)).any()  # gone from the run's copy
    score_ids, _ = load_scores(ctx, "confidence")
    assert (
        not np.isin(ids, score_ids).any()
        and len(score_ids) == len(train) - np.isin(ids, train.sample_ids).sum()
    )
    # every reader of the records still works in a fresh process (reads the compacted copy)
    again = open_run(ctx.storage.uri, ctx.run_id)
    assert len(again.records) == len(ctx.plan.sample_ids) - len(ids)
    assert not np.isin(ids, again.split_records("train").sample_ids).any()
    for k in range(3):
        assert not np.isin(ids, again.shard_data(k).sample_ids).any()
    assert len(again.split_records("test").sample_ids)
    # measuring what was forgotten reads the rows from the source outside the run
    _, forget, _ = eval_sets(again, ids)
    trained = ids[again.plan.locate(ids)[0] != TEST]
    assert forget.sample_ids.tolist() == sorted(trained.tolist())
    # a second deletion on the compacted run works (exclude lists ids no longer present)
    _forget(again, _owner(again, 5))
    doc = scan_residue(again)
    assert doc["clean"], doc["finds"]
    assert doc["deleted_samples"] == len(again.deletion_log.deleted_sample_ids())
    assert doc["rows_scanned_for"] > 0
    whys = {a["why"] for a in doc["allowed"]}
    assert {"deletion log", "partition plan", "retired version's sample list"} <= whys
    # the shared bundled cache is outside the run: reported, never touched
    (src,) = outside_sources(again)
    assert src["deleted_rows"] == len(again.deletion_log.deleted_sample_ids())


def test_the_scan_finds_planted_residue(tiny_run):
    ctx = tiny_run
    owner = _owner(ctx, 1)
    ids = ctx.plan.samples_of_owner(owner)
    row = ctx.records.features[ctx.records.index_of(ids[:1])][0].astype("<f4").tobytes()
    _forget(ctx, owner)
    assert scan_residue(ctx)["clean"]

    rep = ctx.layout.reports
    ctx.storage.write_bytes(f"{rep}/blob.bin", b"header" + row + b"trailer")
    ctx.storage.write_json(f"{rep}/scores.json", {"per_sample": [{"sample_id": int(ids[0])}]})
    feats = pa.FixedSizeListArray.from_arrays(pa.array(np.frombuffer(row, "<f4")), len(row) // 4)
    ctx.storage.write_table(f"{rep}/feats.parquet", pa.table({"x": feats}))
    doc = scan_residue(ctx)

    found = {(f["file"].rsplit("/", 1)[-1], f["kind"]) for f in doc["finds"]}
    assert ("blob.bin", "feature bytes") in found
    assert ("scores.json", "ids in json") in found
    assert ("feats.parquet", "rows in column x") in found
    assert not doc["clean"]


def test_manual_compaction_waits_and_the_scan_says_so(tmp_path):
    ctx = create_run(tiny_config(tmp_path, "data.compact=manual"))
    train_all_shards(ctx)
    owner = _owner(ctx, 0)
    ids = ctx.plan.samples_of_owner(owner)
    _forget(ctx, owner)

    assert np.isin(ids, _copy_ids(ctx)).all()  # still there: manual
    assert waiting_for_compaction(ctx)["rows_waiting"] == len(ids)
    doc = scan_residue(ctx)
    assert not doc["clean"]
    assert any(f["file"].startswith(ctx.layout.data_parts + "/") for f in doc["finds"])

    assert compact(ctx)["rows_removed"] == len(ids)
    assert compact(ctx)["rows_removed"] == 0  # idempotent
    assert waiting_for_compaction(ctx)["rows_waiting"] == 0
    assert scan_residue(ctx)["clean"]
