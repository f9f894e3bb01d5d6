"""The stored sample index of live versions: same answers as reading every version's sample
list, stored per chain, dropped with the versions it names."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from ray_unlearn.platform.core import sample_index
from ray_unlearn.platform.core.storage import RunLayout, Storage
from ray_unlearn.platform.core.versions import ModelStore, Registry, ShardEntry

LAYOUT = RunLayout("run-1")


def _store(tmp_path, rng, shards=3, slices=3):
    store = ModelStore(Storage(tmp_path), LAYOUT)
    reg = Registry()
    held = {}
    for k in range(shards):
        chain, ids = [], np.zeros(0, np.int64)
        for r in range(slices):
            ids = np.union1d(ids, rng.choice(10_000, size=20, replace=False))
            vid = f"s{k:03d}-r{r:02d}-g0000"
            store.save_version(
                shard=k,
                stage=r,
                generation=0,
                state={"w": torch.zeros(1)},
                sample_ids=ids,
                parent=chain[-1] if chain else None,
                metrics={},
                config_digest="d",
                created_by="test",
            )
            chain.append(vid)
            held[vid] = set(ids.tolist())
        reg.shards[k] = ShardEntry(chain, 0)
    store.write_registry(reg)
    return store, held


def _brute(held, live, wanted):
    out = {}
    for vid in live:
        hits = sorted(set(wanted) & held[vid])
        if hits:
            out[vid] = hits
    return out


def test_index_answers_like_the_sample_lists(tmp_path):
    rng = np.random.default_rng(0)
    store, held = _store(tmp_path, rng)
    live = store.registry().live_versions()
    some = sorted({i for v in held.values() for i in list(v)[:3]})
    for wanted in ([some[0]], some, [123_456], some + [10**12]):
        assert store.live_versions_containing(wanted) == _brute(held, live, wanted)
    files = Storage(tmp_path).listdir(sample_index.index_dir(LAYOUT))
    assert len(files) == 3  # one group per shard's chain
    # a cold process reads the stored groups, not the versions' sample lists
    cold = ModelStore(Storage(tmp_path), LAYOUT)
    cold.sample_ids = None  # type: ignore[assignment]  # would fail if called
    assert cold.live_versions_containing(some) == _brute(held, live, some)


def test_retiring_a_version_drops_the_groups_that_name_it(tmp_path):
    rng = np.random.default_rng(1)
    store, held = _store(tmp_path, rng)
    store.live_versions_containing([1])
    folder = sample_index.index_dir(LAYOUT)
    assert len(Storage(tmp_path).listdir(folder)) == 3
    store.retire(["s001-r02-g0000"], request_ids=["req"])
    assert len(Storage(tmp_path).listdir(folder)) == 2
    # the chain changes: its new group is built, no stale one is kept
    reg = store.registry()
    reg.shards[1] = ShardEntry(reg.shards[1].chain[:2], 1)
    store.write_registry(reg)
    live = reg.live_versions()
    wanted = sorted(held["s001-r02-g0000"])
    assert store.live_versions_containing(wanted) == _brute(held, live, wanted)
    names = Storage(tmp_path).listdir(folder)
    assert sorted(names) == sorted(
        p.rsplit("/", 1)[1]
        for p in (sample_index.group_path(LAYOUT, tuple(e.chain)) for e in reg.shards.values())
    )


def test_a_new_process_reads_only_the_row_groups_that_may_hold_the_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(sample_index, "ROW_GROUP_ROWS", 8)
    rng = np.random.default_rng(2)
    store, held = _store(tmp_path, rng, shards=2, slices=3)
    live = store.registry().live_versions()
    store.live_versions_containing([0])  # builds and stores the groups (row groups of 8)
    read = []
    real = pq.ParquetFile.read_row_group

    def counted(self, i, *a, **kw):
        read.append(i)
        return real(self, i, *a, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    cold = ModelStore(Storage(tmp_path), LAYOUT)
    one = min(held["s000-r00-g0000"])
    assert cold.live_versions_containing([one]) == _brute(held, live, [one])
    assert 1 <= len(read) <= 2  # its row group in each chain's file that may hold it
    everything = sorted({i for v in held.values() for i in v})
    assert cold.live_versions_containing(everything) == _brute(held, live, everything)
    first = len(read)
    assert cold.live_versions_containing(everything) == _brute(held, live, everything)
    assert len(read) == first  # row groups read once are kept
