"""S3T: order selection, deactivation, layer isolation and exactness of truncated models."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from ray_unlearn.platform.core.config import ModelConfig
from ray_unlearn.platform.core.models import MLP, SmallCNN
from ray_unlearn.platform.core.training import ShardData
from ray_unlearn.platform.methods.s3t.adapters import base_state
from ray_unlearn.platform.methods.s3t.orders import (
    best_order,
    bms_orders,
    bms_score,
    cyclic_orders,
    deletion_rate_formula,
    harmonic,
    simulate_deletion_rate,
    surviving_prefix,
)
from ray_unlearn.platform.methods.s3t.training import (
    S3TConfig,
    S3TConfigError,
    S3TShard,
    _inject,
    adapter_name,
    check_s3t,
    default_block_names,
    model_for,
    pretrain_backbone,
    public_mask,
    shard_data_from,
    train_order,
    train_s3t,
)
from tests.conftest import sliced_shard_data

torch.set_num_threads(1)

# -- orders --------------------------------------------------------------------------------


def test_cyclic_orders_by_hand():
    assert cyclic_orders(3, 3) == [(0, 1, 2), (1, 2, 0), (2, 0, 1)]
    assert cyclic_orders(4, 2) == [(0, 1, 2, 3), (1, 2, 3, 0)]
    assert cyclic_orders(3, 1) == [(0, 1, 2)]
    # B > L: rotations of the suffixes after position 1, spread over the L rotations.
    assert cyclic_orders(3, 4) == [(0, 1, 2), (0, 2, 1), (1, 2, 0), (2, 0, 1)]
    assert sorted(cyclic_orders(3, 6)) == sorted(itertools.permutations(range(3)))
    with pytest.raises(ValueError, match="exceeds the 6 distinct orders"):
        cyclic_orders(3, 7)


@pytest.mark.parametrize("select", [cyclic_orders, bms_orders])
def test_orders_are_distinct_permutations_with_diverse_first_slices(select):
    for L in range(1, 6):
        for B in sorted({1, 2, L, L + 1, 2 * L, math.factorial(L)}):
            if B > math.factorial(L):
                continue
            orders = select(L, B)
            assert len(orders) == B and len(set(orders)) == B, (L, B, orders)
            assert all(sorted(o) == list(range(L)) for o in orders)
            assert len({o[0] for o in orders}) == min(B, L), (L, B, orders)


def test_bms_score_by_hand():
    # prior (0.5, 0.25, 0.25), horizon 2: (1-.5)^2 + (1-.75)^2 + 0 = 0.3125
    assert bms_score((0, 1, 2), [0.5, 0.25, 0.25], 2) == pytest.approx(0.3125)
    assert bms_score((1, 2, 0), [0.5, 0.25, 0.25], 2) == pytest.approx(0.5625 + 0.25)


def test_bms_first_slices_differ_and_skewed_prior_pushes_slice_late():
    rng = np.random.default_rng(0)
    for L in range(2, 7):
        for _ in range(5):
            prior = rng.dirichlet(np.ones(L))
            a, b = bms_orders(L, 2, prior)
            assert a[0] != b[0]
    # Slice 0 is the likeliest to be deleted: it is never among the first L-2 positions,
    # and losing it still leaves a prefix of L-1 stages.
    prior = [0.7, 0.1, 0.1, 0.1]
    orders = bms_orders(4, 2, prior)
    assert all(o.index(0) >= 2 for o in orders), orders
    assert best_order(orders, {0})[1] == 3
    # With B = L every position is a perfect matching (a Latin square), as in the paper.
    square = bms_orders(4, 4, [0.4, 0.3, 0.2, 0.1])
    for pos in range(4):
        assert sorted(o[pos] for o in square) == [0, 1, 2, 3]
    # and the likeliest slice goes later on average than under the uniform prior
    mean_pos = np.mean([o.index(0) for o in bms_orders(5, 3, [0.6, 0.1, 0.1, 0.1, 0.1])])
    assert mean_pos > np.mean([o.index(0) for o in bms_orders(5, 3)])
    with pytest.raises(ValueError, match="one probability per slice"):
        bms_orders(3, 2, [0.5, 0.5])


def test_surviving_prefix_and_best_order_by_hand():
    assert surviving_prefix((2, 0, 1), set()) == 3
    assert surviving_prefix((2, 0, 1), {1}) == 2
    assert surviving_prefix((2, 0, 1), {0, 1}) == 1
    assert surviving_prefix((2, 0, 1), {2}) == 0
    orders = cyclic_orders(3, 3)  # (0,1,2) (1,2,0) (2,0,1)
    assert best_order(orders, set()) == (0, 3)  # tie: lowest index
    assert best_order(orders, {2}) == (0, 2)  # prefixes 2, 1, 0
    assert best_order(orders, {1}) == (2, 2)  # prefixes 1, 0, 2
    assert best_order([(0, 1, 2), (0, 2, 1)], {1, 2}) == (0, 1)  # tie -> lowest index
    assert best_order(orders, {0}) == (1, 2)
    assert best_order(orders, {0, 1, 2}) == (0, 0)


def test_deletion_rate_simulation_matches_the_coupon_collector_formula():
    assert harmonic(3) == pytest.approx(1 + 1 / 2 + 1 / 3)
    assert deletion_rate_formula(2, 3, 5) == pytest.approx(6 * harmonic(6))  # min(B, L) = 3
    for b, sel in [(1, "cyclic"), (3, "cyclic"), (2, "bms")]:
        rec = simulate_deletion_rate(3, 3, b, sel, seeds=300)
        assert rec["ratio"] == pytest.approx(1.0, abs=0.1), rec
    sisa = simulate_deletion_rate(3, 3, 1, "sisa", seeds=50)
    assert (
        sisa["deletions_mean"]
        == simulate_deletion_rate(3, 3, 1, "cyclic", seeds=50)["deletions_mean"]
    )
    assert simulate_deletion_rate(3, 3, 3, seeds=50)["deletions_mean"] > sisa["deletions_mean"]


# -- config ----------------------------------------------------------------------------------


def _mlp(depth: int = 3, width: int = 6) -> MLP:
    return MLP(5, [width] * depth, 3)


def test_config_rejects_unknown_fields_and_bad_values():
    with pytest.raises(ValidationError, match="extra"):
        S3TConfig(budget=2, bogus=1)
    with pytest.raises(ValidationError, match="only used by selection=bms"):
        S3TConfig(selection="cyclic", deletion_prior=[0.5, 0.5])
    with pytest.raises(ValidationError, match="repeated: body.0"):
        S3TConfig(block_names=["body.0", "body.0"])
    with pytest.raises(ValidationError):
        S3TConfig(budget=0)


def test_check_lists_every_problem_and_matches_names_exactly():
    assert default_block_names(_mlp()) == ["body.0", "body.2", "body.4"]
    assert check_s3t(S3TConfig(), _mlp(), 3) == ["body.0", "body.2", "body.4"]
    cnn = SmallCNN((1, 4, 4), [2, 2], 3)
    assert default_block_names(cnn) == ["body.0", "body.2"]
    with pytest.raises(S3TConfigError) as err:
        check_s3t(
            S3TConfig(
                budget=25,
                selection="bms",
                deletion_prior=[1.0, 1.0],
                block_names=["body.0", "body.1", "body.10"],
                retrain_depth_threshold=5,
            ),
            _mlp(),
            4,
        )
    msg = str(err.value)
    assert "'body.1' is a ReLU" in msg
    assert "'body.10' is not a module" in msg
    # orders are permutations of the R slices, whatever the number of blocks L
    assert "L = 3 block(s) (body.0, body.1, body.10) is fewer than the R = 4 slices" in msg
    assert "B=25 exceeds the 24 distinct orders" in msg
    assert "retrain_depth_threshold" in msg and "deletion_prior" in msg


def test_injection_targets_exactly_one_block():
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(*[nn.Linear(4, 4) for _ in range(11)])
            self.head = nn.Linear(4, 2)

    model = Deep()
    _inject(model, "a", "body.1", 2, 4.0, 0)
    adapted = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A"))
    assert adapted == ["body.1"]  # not body.10


# -- training, isolation, exactness ------------------------------------------------------------

L = 3


def _data(shard: int = 0, per_slice: int = 12, seed: int = 0) -> ShardData:
    return sliced_shard_data(per_slice, seed, shard, L)


CFG = S3TConfig(budget=3, epochs=2, pretrain_epochs=2, batch_size=8, lr=0.01, lora_rank=2)
BLOCKS = ["body.0", "body.2", "body.4"]


@pytest.fixture(scope="module")
def backbone():
    torch.set_num_threads(1)
    pub = _data(shard=99, seed=1)
    return pretrain_backbone(
        ModelConfig(hidden=[6, 6, 6]),
        (5,),
        3,
        shard_data_from(pub.features, pub.labels, pub.sample_ids, 0x7FFE),
        CFG,
        seed=0,
    )


@pytest.fixture(scope="module")
def pretrained(backbone):
    """The backbone's weights before any order trained on it (it is shared, never copied:
    adapter slots are injected into it)."""
    return {k: v.clone() for k, v in base_state(backbone).items()}


@pytest.fixture(scope="module")
def trained(backbone, pretrained):
    """Order (2, 0, 1) trained on _data(), with every stage's full state and probe outputs."""
    probe = torch.randn(7, 5, generator=torch.Generator().manual_seed(5))
    states, outputs = [], []
    with torch.no_grad():
        outputs.append(backbone(probe).clone())

    def on_stage(snap, model):
        states.append({n: p.detach().clone() for n, p in model.named_parameters()})
        with torch.no_grad():
            outputs.append(model(probe).clone())

    snaps = train_order(
        backbone, _data(), (2, 0, 1), 0, CFG, seed=0, blocks=BLOCKS, on_stage=on_stage
    )
    return snaps, states, outputs, probe


def test_stage_i_trains_the_ith_block_from_the_top_and_nothing_else(backbone, pretrained, trained):
    snaps, states, _, _ = trained
    base = pretrained
    after = base_state(backbone)  # the shared backbone is bitwise what it was
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)
    for i, (snap, state) in enumerate(zip(snaps, states, strict=True), start=1):
        assert snap.block == BLOCKS[L - i] and snap.adapter == adapter_name(0, i)
        own = {n for n in state if snap.adapter in n.split(".")}
        assert own and all(n.startswith(snap.block + ".lora_") for n in own)
        prev = states[i - 2] if i > 1 else None
        for n, t in state.items():
            if n in own or n.startswith("head."):
                continue
            if ".lora_" in n:  # an earlier stage's adapter: bitwise unchanged
                assert torch.equal(t, prev[n]), f"stage {i} changed {n}"
            else:  # the backbone: bitwise the pre-trained weights
                assert torch.equal(t, base[n.replace(".base_layer", "")]), n
        # the stage did train: its adapter left the zero init and the head moved
        assert any(".lora_B." in n and state[n].abs().sum() > 0 for n in own)
        ref_head = prev if prev is not None else base
        assert not torch.equal(state["head.weight"], ref_head["head.weight"])
    # stage i trained on the union of the order's first i slices (2, then 2+0, then all)
    order = (2, 0, 1)
    data = _data()
    for i, snap in enumerate(snaps, start=1):
        expect = data.sample_ids[np.isin(data.slices, order[:i])]
        assert np.array_equal(snap.sample_ids, expect)


def test_truncated_model_equals_the_stage_snapshot_bitwise(backbone, trained):
    snaps, _, outputs, probe = trained
    for prefix in range(L + 1):
        with torch.no_grad():
            out = model_for(backbone, snaps, prefix)(probe)
        assert torch.equal(out, outputs[prefix]), f"prefix {prefix}"
    assert not torch.equal(outputs[L], outputs[L - 1])  # the comparison can fail


def test_stage_p_does_not_depend_on_later_slices(backbone, trained):
    snaps = trained[0]
    data = _data()
    changed = data.without(data.sample_ids[data.slices == 1][:5])  # slice 1 is last in (2,0,1)
    again = train_order(backbone, changed, (2, 0, 1), 0, CFG, seed=0, blocks=BLOCKS)
    for a, b in zip(snaps[:2], again[:2], strict=True):
        for k in a.tensors():
            assert torch.equal(a.tensors()[k], b.tensors()[k])
    assert not torch.equal(snaps[2].head_state["head.weight"], again[2].head_state["head.weight"])


def test_interleaved_orders_equal_orders_trained_one_by_one(backbone, trained):
    """The Ray Train job trains stage round by stage round across orders; that must give
    each order exactly what training it in one go gives."""
    from ray_unlearn.platform.methods.s3t.training import iter_order_stages

    data = _data()
    gens = [
        iter_order_stages(backbone, data, o, b, CFG, seed=0, blocks=BLOCKS)
        for b, o in enumerate([(2, 0, 1), (0, 1, 2)])
    ]
    rounds = [[next(g)[0] for g in gens] for _ in range(L)]
    alone = [trained[0], train_order(backbone, data, (0, 1, 2), 1, CFG, seed=0, blocks=BLOCKS)]
    for b in range(2):
        for i in range(L):
            got, want = rounds[i][b].tensors(), alone[b][i].tensors()
            assert got.keys() == want.keys()
            assert all(torch.equal(got[n], want[n]) for n in want), (b, i)


@pytest.fixture
def shard(backbone, trained):
    data = _data()
    orders = [(2, 0, 1), (0, 1, 2), (1, 2, 0)]
    snaps = [trained[0]] + [
        train_order(backbone, data, o, b, CFG, seed=0, blocks=BLOCKS)
        for b, o in enumerate(orders[1:], start=1)
    ]
    return S3TShard(0, backbone, orders, snaps, data.sample_ids, data.slices, 2)


def test_delete_deactivates_without_training_and_serves_exactly(backbone, trained, shard):
    _, _, outputs, probe = trained
    deleted = [int(shard.sample_ids[shard.slices == 1][3])]  # slice 1: position 3 of order 0
    out = shard.delete(deleted)
    # order 0 (2,0,1) keeps 2 stages, order 1 (0,1,2) keeps 1, order 2 (1,2,0) none
    assert shard.prefixes() == [2, 1, 0]
    assert out["deactivated"] == {0: [3], 1: [2, 3], 2: [1, 2, 3]}
    assert (out["order"], out["prefix"], out["dead"]) == (0, 2, False)
    assert out["seconds"] < 0.05
    assert not np.isin(deleted, shard.retained_sample_ids()).any()
    assert all(not np.isin(deleted, s.sample_ids).any() for s in shard.serving_stages())
    # the served model is the stage-2 snapshot of order 0, bitwise
    probs = shard.predict_proba(probe.numpy())
    assert np.array_equal(probs, torch.softmax(outputs[2], dim=1).numpy())
    # below the depth threshold (2)? not yet; delete in slice 0 -> order 0 keeps 1 stage
    assert not out["needs_retrain"]
    again = shard.delete(deleted)  # idempotent
    assert again["deleted"] == [] and again["already_deleted"] == 1 and again["deactivated"] == {}
    out = shard.delete([int(shard.sample_ids[shard.slices == 0][0])])
    assert (out["order"], out["prefix"], out["needs_retrain"]) == (0, 1, True)
    assert np.array_equal(
        shard.predict_proba(probe.numpy()), torch.softmax(outputs[1], dim=1).numpy()
    )
    before = copy.deepcopy((shard.dead_slices, shard.deleted_ids, shard.prefixes()))
    with pytest.raises(ValueError, match="not in shard 0"):
        shard.delete([int(shard.sample_ids[shard.slices == 2][0]), 5])
    assert (shard.dead_slices, shard.deleted_ids, shard.prefixes()) == before  # unchanged
    out = shard.delete([int(shard.sample_ids[shard.slices == 2][0])])
    assert out["dead"] and out["prefix"] == 0 and shard.predict_proba(probe.numpy()) is None
    assert len(shard.retained_sample_ids()) == 0


def test_cnn_blocks_and_exactness():
    cfg = S3TConfig(budget=1, epochs=1, pretrain_epochs=1, batch_size=4, lora_rank=1)
    mcfg = ModelConfig(kind="cnn", channels=[2, 2, 2])
    g = torch.Generator().manual_seed(0)
    data = ShardData(
        0,
        np.arange(12, dtype=np.int64),
        np.repeat(np.arange(3, dtype=np.int32), 4),
        torch.randn(12, 16, generator=g),
        torch.randint(0, 2, (12,), generator=g),
        3,
    )
    bb = pretrain_backbone(
        mcfg,
        (1, 4, 4),
        2,
        shard_data_from(data.features, data.labels, data.sample_ids, 0x7FFE),
        cfg,
        seed=0,
    )
    blocks = check_s3t(cfg, bb, 3)
    assert blocks == ["body.0", "body.2", "body.4"]
    outs = []
    snaps = train_order(
        bb,
        data,
        (1, 2, 0),
        0,
        cfg,
        seed=0,
        blocks=blocks,
        on_stage=lambda s, m: outs.append(m(data.features).detach().clone()),
    )
    for p in (1, 2, 3):
        assert torch.equal(model_for(bb, snaps, p)(data.features), outs[p - 1])


def test_train_s3t_on_a_run_keeps_public_rows_out_of_shards(tmp_path):
    from ray_unlearn.platform.core.run import create_run
    from tests.conftest import tiny_config

    ctx = create_run(
        tiny_config(
            tmp_path, "model.hidden=[8,8,8]", "partition.shards=2", "training.torch_threads=1"
        )
    )
    cfg = S3TConfig(budget=2, epochs=1, pretrain_epochs=1, public_fraction=0.3)
    system = train_s3t(ctx, cfg, shards=[0, 1])
    train = ctx.split_records("train")
    assert public_mask(train.owner_ids, 0.3, ctx.config.seed).mean() == pytest.approx(0.3, abs=0.1)
    for s in system.shards.values():
        assert not np.isin(s.sample_ids, system.public_ids).any()
        assert len(s.orders) == 2
    with pytest.raises(ValueError, match="public split"):
        system.delete(system.public_ids[:1])
    victim = system.shards[1].sample_ids[:1]
    out = system.delete(np.concatenate([victim, ctx.split_records("test").sample_ids[:1]]))
    assert list(out["shards"]) == [1] and len(out["untrained"]) == 1
    test = ctx.split_records("test")
    assert set(system.predict_proba(test.features)) == {0, 1}
