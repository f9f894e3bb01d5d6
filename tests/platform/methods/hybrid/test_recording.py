"""Contribution recording as a hook of the SISA driver (what the Ray Train workers run)."""

from __future__ import annotations

import torch

from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.core.training import train_run_shard
from ray_unlearn.platform.methods.hybrid.contributions import (
    RecordingHook,
    has_contributions,
    load_contributions,
    recording_hook,
)
from tests.conftest import tiny_config

REC = ["hybrid.record=true", "hybrid.dtype=float32", "training.torch_threads=1"]


def test_recording_hook_writes_what_train_all_shards_writes(tmp_path):
    """The hook on interleaved drivers (a worker's order) records, beside each generation-0
    version, contributions that lead to its weights, the same as in-process training."""
    torch.set_num_threads(1)
    assert recording_hook(create_run(tiny_config(tmp_path / "off")), 0) is None
    a = create_run(tiny_config(tmp_path / "a", *REC))
    train_all_shards(a)
    b = create_run(tiny_config(tmp_path / "b", *REC))
    shards = range(b.config.partition.shards)
    hooks = {k: recording_hook(b, k) for k in shards}
    assert all(isinstance(h, RecordingHook) for h in hooks.values())
    runs = {k: train_run_shard(b, k, hook=hooks[k]) for k in shards}
    for _ in range(b.config.partition.slices):
        for k in shards:
            next(runs[k])
    assert sum(h.summary()["contribution_bytes"] for h in hooks.values()) > 0
    for k in shards:
        for vid in a.model_store.registry().shards[k].chain:
            assert has_contributions(b.storage, b.layout, vid)  # written before any version
            weights = a.model_store.load_state(vid)
            ca = load_contributions(a.storage, a.layout, vid, expect=weights)
            cb = load_contributions(b.storage, b.layout, vid, expect=weights)  # same weights
            assert (ca.ids == cb.ids).all() and (ca.offsets == cb.offsets).all()
            assert all(torch.equal(ca.deltas[n], cb.deltas[n]) for n in ca.deltas)
