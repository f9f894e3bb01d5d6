"""SISA shard training: retraining from the snapshot before the first affected slice equals
training from scratch without the deleted samples, bit for bit (CPU, fixed thread count; CUDA
with deterministic kernels, where a GPU exists)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_unlearn.platform.core.training import stage_batches, stage_steps, train_shard
from ray_unlearn.platform.methods import ShardState, get_strategy
from tests.conftest import needs_cuda, tiny_config


def _train(ctx, data):
    cfg = ctx.config
    return train_shard(
        data,
        cfg.model,
        cfg.training,
        seed=cfg.seed,
        feature_shape=ctx.feature_shape,
        num_classes=ctx.num_classes,
    )


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(params=["mlp", "cnn"])
def ctx(request, tmp_path):
    from ray_unlearn.platform.core.run import create_run

    extra = ["model.kind=cnn", "model.channels=[4,8]"] if request.param == "cnn" else []
    return create_run(tiny_config(tmp_path, *extra))


@pytest.mark.parametrize("slice_hit", [0, 1, 2])
def test_retrain_equals_scratch_bitwise(ctx, slice_hit):
    _retrain_equals_scratch(ctx, slice_hit)


@needs_cuda
@pytest.mark.parametrize("slice_hit", [0, 2])
def test_retrain_equals_scratch_bitwise_on_cuda(ctx, slice_hit):
    ctx.config.training.device = "cuda"  # deterministic kernels: core/device.py
    _retrain_equals_scratch(ctx, slice_hit)


def _retrain_equals_scratch(ctx, slice_hit):
    torch.set_num_threads(1)
    data = ctx.shard_data(1)
    full = _train(ctx, data)
    in_slice = data.sample_ids[data.slices == slice_hit]
    later = data.sample_ids[data.slices == 2]
    deleted = np.unique(np.concatenate([in_slice[:3], later[-2:]]))  # first affected: slice_hit

    update = get_strategy("sisa")(ctx).unlearn_shard(
        ShardState(data, [s.state for s in full], [f"v{i}" for i in range(3)], [True] * 3),
        deleted,
    )
    scratch = _train(ctx, data.without(deleted))

    assert update.first_stage == slice_hit and update.exact
    for stage in range(slice_hit):  # stages before the hit are reused, not retrained
        assert _equal(full[stage].state, scratch[stage].state)
    for new, ref in zip(update.stages, scratch[slice_hit:], strict=True):
        assert new.stage == ref.stage
        assert _equal(new.state, ref.state), f"stage {new.stage} differs from scratch training"
        assert np.array_equal(new.sample_ids, ref.sample_ids)
        assert not np.isin(deleted, new.sample_ids).any()
    # The test can fail: the deletion really changed the final model.
    assert not _equal(full[-1].state, scratch[-1].state)


def test_training_is_reproducible_and_seed_dependent(tmp_path):
    from ray_unlearn.platform.core.run import create_run

    ctx = create_run(tiny_config(tmp_path))
    data = ctx.shard_data(0)
    a, b = _train(ctx, data), _train(ctx, data)
    assert all(_equal(x.state, y.state) for x, y in zip(a, b, strict=True))
    ctx.config.seed = 1
    c = _train(ctx, data)
    assert not _equal(a[-1].state, c[-1].state)


def test_stage_work_depends_only_on_its_own_slice():
    assert stage_steps(100, 3, 32) == 10  # ceil(300 / 32)
    assert stage_steps(0, 3, 32) == 0
    batches = list(stage_batches(50, 7, 16, seed=0, shard=2, stage=1))
    assert len(batches) == 7 and [len(b) for b in batches[:4]] == [16, 16, 16, 2]
    assert sorted(np.concatenate(batches[:4]).tolist()) == list(range(50))  # one full pass first
    again = list(stage_batches(50, 7, 16, seed=0, shard=2, stage=1))
    assert all(np.array_equal(x, y) for x, y in zip(batches, again, strict=True))


def test_deleting_a_whole_slice_skips_its_stage(tmp_path):
    from ray_unlearn.platform.core.run import create_run

    ctx = create_run(tiny_config(tmp_path))
    data = ctx.shard_data(0)
    gone = data.sample_ids[data.slices == 2]
    stages = _train(ctx, data.without(gone))
    assert stages[2].metrics["steps"] == 0
    assert _equal(stages[1].state, stages[2].state)
