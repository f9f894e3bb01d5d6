"""persist_stages saves a generation's versions at once (threads) with the durability of the
serial saves: a chain in stage order, and every file and folder fsynced before it returns."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from ray_unlearn.platform.core import runtime
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.core.training import StageResult
from ray_unlearn.platform.core.versions import ModelStore
from tests.conftest import tiny_config

R = 5  # slices


@pytest.fixture
def ctx(tmp_path):
    return create_run(tiny_config(tmp_path))


def _stages() -> list[StageResult]:
    g = torch.Generator().manual_seed(0)
    ids = np.arange(500, dtype=np.int64) * 3
    return [
        StageResult(s, {"w": torch.randn(32, 64, generator=g)}, ids[: (s + 1) * 100], {"s": s})
        for s in range(R)
    ]


def _fd_path(fd: int) -> str:
    return os.path.realpath(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name an fd")
def test_a_chain_in_stage_order_every_file_synced_before_it_returns(ctx, monkeypatch):
    stages = _stages()
    events: list[tuple[str, str, str]] = []  # ("fsync", path, "") / ("replace", src, dst)
    savers: set[int] = set()
    real_fsync, real_replace, real_save = os.fsync, os.replace, ModelStore.save_version

    def fsync(fd):
        events.append(("fsync", _fd_path(fd), ""))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst)

    def save_version(self, **kw):
        savers.add(threading.get_ident())
        return real_save(self, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(ModelStore, "save_version", save_version)
    vids = runtime.persist_stages(ctx, 1, 3, stages, "s001-r00-g0000", "test")
    done = list(events)  # what had happened when it returned
    monkeypatch.undo()
    assert len(savers) > 1  # the saves did run in threads of their own
    store = ctx.model_store
    assert vids == [f"s001-r{s:02d}-g0003" for s in range(R)]
    parents = [store.manifest(v)["parent"] for v in vids]
    assert parents == ["s001-r00-g0000", *vids[:-1]]
    for v, st in zip(vids, stages, strict=True):
        assert torch.equal(store.load_state(v)["w"], st.state["w"])
        store._samples_cache.clear()  # from the file, not the cache the save filled
        np.testing.assert_array_equal(store.sample_ids(v), st.sample_ids)
        folder = os.path.realpath(ctx.storage.full(ctx.layout.version_dir(v)))
        files = sorted(os.listdir(folder))
        assert files == ["manifest.json", "samples.parquet", "weights.safetensors"]
        last_rename = 0
        for f in files:  # its content synced, then renamed in place
            i = next(
                i for i, e in enumerate(done) if e[0] == "replace" and e[2].endswith(f"/{v}/{f}")
            )
            assert ("fsync", done[i][1], "") in done[:i], f"{v}/{f} renamed before its fsync"
            last_rename = max(last_rename, i)
        # then its folder (the entries' rename), before persist_stages returned
        assert ("fsync", folder, "") in done[last_rename:], f"{v}: folder not synced after"


def test_a_failed_save_is_raised_after_the_others_are_whole(ctx, monkeypatch):
    real_save = ModelStore.save_version

    def save_version(self, **kw):
        if kw["stage"] == 2:
            raise OSError("disk full")
        return real_save(self, **kw)

    monkeypatch.setattr(ModelStore, "save_version", save_version)
    with pytest.raises(OSError, match="disk full"):
        runtime.persist_stages(ctx, 0, 1, _stages(), None, "test")
    # the other saves finished (a thread is never cut mid-file): whole versions, unpublished,
    # which recovery retires as strays outside the live chain (core/publish.py)
    store = ctx.model_store
    for s in (0, 1, 3, 4):
        assert store.manifest(f"s000-r{s:02d}-g0001")["slice"] == s
    assert not ctx.storage.exists(ctx.layout.version_manifest("s000-r02-g0001"))


def test_one_stage_is_saved_in_the_callers_thread(ctx, monkeypatch):
    savers = []
    real_save = ModelStore.save_version

    def save_version(self, **kw):
        savers.append(threading.get_ident())
        return real_save(self, **kw)

    monkeypatch.setattr(ModelStore, "save_version", save_version)
    assert runtime.persist_stages(ctx, 2, 1, _stages()[:1], None, "test") == ["s002-r00-g0001"]
    assert runtime.persist_stages(ctx, 2, 2, [], None, "test") == []
    assert savers == [threading.get_ident()]
