"""The one training loop (``run_steps``) and the one SISA driver (``train_run_shard``)."""

from __future__ import annotations

import numpy as np
import torch

from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.core.training import (
    ShardData,
    init_model,
    run_steps,
    stage_batches,
    stage_steps,
    take_rows,
    train_run_shard,
    train_shard,
    train_stage,
)
from tests.conftest import tiny_config


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_run_steps_hook_sees_every_step_and_changes_nothing():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    batches = [np.arange(i, min(i + 16, 40)) for i in range(0, 40, 16)]
    plain, hooked = _net(1), _net(1)
    seen = []

    def hook(step, rows, before, after):
        # the update of this step, taken from live tensors: copy what is kept
        delta = {k: after[k] - before[k] for k in after}
        seen.append((step, np.asarray(rows).tolist(), delta))

    loss_a, n_a = run_steps(plain, torch.optim.SGD(plain.parameters(), lr=0.1), x, y, batches)
    opt = torch.optim.SGD(hooked.parameters(), lr=0.1)
    start = {k: v.detach().clone() for k, v in hooked.named_parameters()}
    loss_b, n_b = run_steps(hooked, opt, x, y, batches, on_step=hook)
    assert (loss_a, n_a) == (loss_b, n_b) and n_a == 40
    assert _equal(plain.state_dict(), hooked.state_dict())
    assert [s for s, _, _ in seen] == [0, 1, 2]
    assert [r for _, r, _ in seen] == [b.tolist() for b in batches]
    # the hook's updates add up to the whole change of the weights
    for k, v in hooked.named_parameters():
        total = start[k] + sum(d[k] for _, _, d in seen)
        assert torch.allclose(total, v.detach(), atol=1e-6)
        assert all(d[k].abs().sum() > 0 for _, _, d in seen)


def test_driver_interleaved_across_shards_equals_one_shard_at_a_time(tmp_path):
    """What a Ray Train worker does (stage i of each of its shards in turn) gives the
    snapshots of training each shard alone (``train_shard``), bit for bit."""
    torch.set_num_threads(1)
    ctx = create_run(tiny_config(tmp_path, "training.torch_threads=1"))
    cfg = ctx.config
    shards = range(cfg.partition.shards)
    runs = {k: train_run_shard(ctx, k) for k in shards}
    interleaved = {k: [] for k in shards}
    for _ in range(cfg.partition.slices):
        for k in shards:
            interleaved[k].append(next(runs[k]))
    for k in shards:
        assert next(runs[k], None) is None  # one stage per slice, then done
        alone = train_shard(
            ctx.shard_data(k),
            cfg.model,
            cfg.training,
            seed=cfg.seed,
            feature_shape=ctx.feature_shape,
            num_classes=ctx.num_classes,
        )
        assert [s.stage for s in interleaved[k]] == list(range(cfg.partition.slices))
        for a, b in zip(interleaved[k], alone, strict=True):
            assert _equal(a.state, b.state)
            assert np.array_equal(a.sample_ids, b.sample_ids)
            assert a.metrics["steps"] == b.metrics["steps"] > 0


def test_cpu_stage_indexes_the_shard_in_place_and_trains_the_same_steps(tmp_path):
    """On the CPU a stage's batches read the shard's tensors through its rows instead of a
    gathered copy of them (train_stage): the weights and the batches' sample ids are those
    of the loop over the gathered copy, bit for bit, for every stage of a shard."""
    torch.set_num_threads(1)
    ctx = create_run(tiny_config(tmp_path, "training.torch_threads=1"))
    cfg, data = ctx.config, ctx.shard_data(1)
    model = init_model(cfg.model, ctx.feature_shape, ctx.num_classes, cfg.seed, data.shard)
    ref = init_model(cfg.model, ctx.feature_shape, ctx.num_classes, cfg.seed, data.shard)
    got_ids, ref_ids = [], []
    for stage in range(data.num_slices):
        train_stage(
            model,
            data,
            stage,
            cfg.training,
            cfg.seed,
            on_step=lambda st, step, ids, b, a: got_ids.append((st, step, ids.tolist())),
        )
        # the reference: the stage's rows gathered once, batches of positions into them
        rows = np.flatnonzero(data.slices <= stage)
        sel = torch.from_numpy(rows)
        steps = stage_steps(
            int((data.slices == stage).sum()), cfg.training.epochs, cfg.training.batch_size
        )
        batches = list(stage_batches(len(rows), steps, cfg.training.batch_size, cfg.seed, 1, stage))
        ref_ids += [(stage, i, data.sample_ids[rows[b]].tolist()) for i, b in enumerate(batches)]
        opt = torch.optim.Adam(
            ref.parameters(), lr=cfg.training.lr, weight_decay=cfg.training.weight_decay
        )
        run_steps(ref, opt, data.features[sel], data.labels[sel], batches)
        assert _equal(model.state_dict(), ref.state_dict()), stage
    assert got_ids == ref_ids and len(got_ids) > data.num_slices


def test_take_rows_equals_indexing_for_every_kind_of_shard_tensor():
    """take_rows (numpy's copy, for its huge pages) gives exactly ``t[rows]``: features of
    any rank and dtype, labels, a non-contiguous tensor; and ShardData.without keeps the
    other rows, in order."""
    g = torch.Generator().manual_seed(0)
    rows = np.array([5, 0, 3, 3, 9])
    tensors = [
        torch.randn(10, 6, generator=g),
        torch.randint(0, 50, (10, 7), generator=g),  # token ids
        torch.randn(10, 1, 4, 4, generator=g),  # images
        torch.randn(6, 10, generator=g).t(),  # not contiguous
        torch.randn(10, 3, generator=g).to(torch.bfloat16),  # no numpy view
    ]
    for t in tensors:
        out = take_rows(t, rows)
        assert out.dtype == t.dtype and torch.equal(out, t[torch.from_numpy(rows)])
    data = ShardData(
        shard=0,
        sample_ids=np.array([4, 1, 7, 2], dtype=np.int64),
        slices=np.array([0, 1, 0, 1], dtype=np.int32),
        features=tensors[0][:4],
        labels=torch.arange(4),
        num_slices=2,
    )
    assert data.sample_ids.tolist() == [1, 2, 4, 7]  # sorted by id, rows with them
    assert data.labels.tolist() == [1, 3, 0, 2]
    assert torch.equal(data.features, tensors[0][[1, 3, 0, 2]])
    rest = data.without([2, 7])
    assert rest.sample_ids.tolist() == [1, 4] and rest.slices.tolist() == [1, 0]
    assert rest.labels.tolist() == [1, 0] and torch.equal(rest.features, tensors[0][[1, 0]])
