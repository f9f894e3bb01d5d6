"""Per-shard reads: a process that loads one shard reads only that shard's rows from the
run's copy (a row group at a time), gets exactly what the whole-data path gives, and its
memory does not grow with the rows of the shards it does not own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ray_unlearn.platform.core.compaction import compact, read_copy
from ray_unlearn.platform.core.config import load_config
from ray_unlearn.platform.core.copy_parts import write_copy_table
from ray_unlearn.platform.core.data import Records, write_records
from ray_unlearn.platform.core.data.shard_read import read_rows, row_group_rows
from ray_unlearn.platform.core.run import RunError, create_run, open_run
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


def _same(a, b) -> None:
    assert np.array_equal(a.sample_ids, b.sample_ids) and np.array_equal(a.slices, b.slices)
    assert torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels)


def test_read_rows_reads_only_the_groups_holding_wanted_ids(tmp_path):
    t = pa.table({"sample_id": pa.array(np.arange(100), pa.int64()), "x": np.arange(100.0)})
    pq.write_table(
        t.replace_schema_metadata({b"k": b"v"}), tmp_path / "t.parquet", row_group_size=10
    )
    got = read_rows(str(tmp_path / "t.parquet"), np.array([95, 3, 4, 1000]))
    assert got.column("sample_id").to_pylist() == [3, 4, 95]
    assert got.column("x").to_pylist() == [3.0, 4.0, 95.0]
    assert got.schema.metadata == {b"k": b"v"}
    assert read_rows(str(tmp_path / "t.parquet"), np.array([], np.int64)).num_rows == 0
    assert row_group_rows(t) == (1 << 20) // 16  # 16 bytes a row: 1 MiB groups
    wide = pa.table({"f": pa.array(np.zeros((10, 4096), np.float32).tolist())})
    assert row_group_rows(wide) == 128  # 16 KiB rows: the floor of 128 rows


def test_shard_reads_equal_the_whole_data_path_before_and_after_compaction(tmp_path):
    made = create_run(tiny_config(tmp_path))
    ctx = open_run(made.storage.uri, made.run_id)
    for k in range(3):
        _same(ctx.shard_data(k), made.shard_data(k))
    assert "records" not in ctx.__dict__  # the whole data set was never loaded
    test = ctx.split_records("test")
    assert np.array_equal(test.features, made.split_records("test").features)

    gone = made.plan.shard_members(1)[0][:4]
    made.deletion_log.submit(gone, request_id="r1")
    compact(made, gone)
    after = open_run(made.storage.uri, made.run_id)
    data = after.shard_data(1)
    assert not np.isin(gone, data.sample_ids).any()
    _same(data, made.shard_data(1).without(gone))
    assert "records" not in after.__dict__


def test_a_row_missing_from_the_copy_without_a_deletion_is_an_error(tmp_path):
    made = create_run(tiny_config(tmp_path))
    copy = read_copy(made.storage, made.layout)
    victim = made.plan.shard_members(0)[0][0]
    kept = copy.filter(pa.compute.not_equal(copy["sample_id"], victim))
    write_copy_table(made.storage, made.layout, kept.replace_schema_metadata(copy.schema.metadata))
    with pytest.raises(RunError, match=rf"lacks 1 sample ids .*{victim}.*no deletion removed"):
        open_run(made.storage.uri, made.run_id).shard_data(0)


# -- memory ----------------------------------------------------------------------------------

_PROBE = """
import json, sys, tracemalloc
import pyarrow as pa
from ray_unlearn.platform.core.run import open_run
ctx = open_run(sys.argv[1], sys.argv[2])
tracemalloc.start()
pool_before = pa.default_memory_pool().max_memory()
n = len(ctx.records) if sys.argv[3] == "all" else len(ctx.shard_data(0))
_, py_peak = tracemalloc.get_traced_memory()
arrow_peak = pa.default_memory_pool().max_memory() - pool_before
print(json.dumps({"rows": n, "peak": py_peak + arrow_peak}))
"""

D, ROWS_PER_SHARD = 1024, 600  # 4 KiB per row: a shard is ~2.4 MB


def _probe(tmp_path, shards: int, what: str = "shard") -> dict:
    n = shards * ROWS_PER_SHARD
    rng = np.random.default_rng(shards)
    src = tmp_path / f"data{shards}.parquet"
    write_records(
        Records(
            np.arange(n),
            np.array([f"o{i}" for i in range(n)]),
            rng.integers(0, 2, n),
            rng.random((n, D), dtype=np.float32),
            2,
            (D,),
        ),
        src,
    )
    cfg = load_config(
        None,
        [
            f"storage={tmp_path / 'store'}",
            f"data.source={src}",
            f"partition.shards={shards}",
            "data.test_fraction=0.0",
            "model.hidden=[8]",
        ],
    )
    ctx = create_run(cfg)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, ctx.storage.uri, ctx.run_id, what],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "total": n * D * 4}


def test_a_shards_memory_does_not_grow_with_other_shards_data(tmp_path):
    two, eight = _probe(tmp_path, 2), _probe(tmp_path, 8)
    whole = _probe(tmp_path, 8, "all")
    print("peak bytes:", json.dumps({"2 shards": two, "8 shards": eight, "8, whole": whole}))
    own = ROWS_PER_SHARD * D * 4
    # the measure sees the data: loading everything costs at least the whole data set
    assert whole["peak"] >= whole["total"]
    # shard 0 holds about one shard's rows in both runs (owners hash to shards)
    assert 0.6 * ROWS_PER_SHARD < two["rows"] < 1.4 * ROWS_PER_SHARD
    assert 0.6 * ROWS_PER_SHARD < eight["rows"] < 1.4 * ROWS_PER_SHARD
    # 6 more shards of data not owned (~14.7 MB) add (almost) nothing to the peak
    extra_data = eight["total"] - two["total"]
    grew = eight["peak"] * (two["rows"] / eight["rows"]) - two["peak"]
    assert grew < 0.15 * extra_data, (two, eight, whole)
    # and the shard's peak is a few copies of its own rows (read, converted, validated),
    # far below what the whole data set costs
    assert eight["peak"] < 8 * own and eight["peak"] < 0.3 * whole["peak"], (eight, whole)
