"""Hybrid unlearning: contribution recording, DPUS, the workload estimator, HS/OHS decisions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ray_unlearn.platform.core.audit import audit
from ray_unlearn.platform.core.config import ConfigError, load_config
from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.core.training import stage_batches, train_shard
from ray_unlearn.platform.methods import ShardState, available_strategies, get_strategy
from ray_unlearn.platform.methods.hybrid.contributions import (
    ContributionRecorder,
    MissingContributions,
    StageContributions,
    contribution_path,
    has_contributions,
    load_contributions,
    purge_contributions,
    save_contributions,
    state_digest,
    train_and_record,
)
from ray_unlearn.platform.methods.hybrid.workload import (
    WorkloadEstimate,
    chain_exactness,
    decide,
    estimate_workload,
    optimizer_momentum,
    retrain_work,
    stage_samples,
)
from tests.conftest import tiny_config

REC = ["hybrid.record=true", "training.torch_threads=1"]


@pytest.fixture
def recorded_run(tmp_path):
    """A tiny run trained with contribution recording (float32: exact arithmetic checks)."""
    torch.set_num_threads(1)
    ctx = create_run(tiny_config(tmp_path, *REC, "hybrid.dtype=float32"))
    train_and_record(ctx)
    return ctx


def _train(ctx, data, **kw):
    cfg = ctx.config
    return train_shard(
        data,
        cfg.model,
        cfg.training,
        seed=cfg.seed,
        feature_shape=ctx.feature_shape,
        num_classes=ctx.num_classes,
        **kw,
    )


def _owner_in(ctx, shard: int, slice_: int | None = None, skip: int = 0) -> str:
    owners = np.unique(ctx.plan.owner_ids[ctx.plan.shards == shard])
    hits = []
    for o in owners:
        k, r = ctx.plan.locate(ctx.plan.samples_of_owner(o))
        if (k == shard).all() and (slice_ is None or r.min() == slice_):
            hits.append(str(o))
    return hits[skip]


def _state(ctx, shard: int) -> ShardState:
    chain = ctx.model_store.registry().shards[shard].chain
    return ShardState(
        ctx.shard_data(shard), [ctx.model_store.load_state(v) for v in chain], list(chain)
    )


def _close(a, b, atol=1e-5) -> bool:
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


# -- recording -------------------------------------------------------------------------------


def test_recording_round_trip_and_it_does_not_change_training(recorded_run):
    ctx = recorded_run
    data = ctx.shard_data(1)
    rec = ContributionRecorder("float16")
    with_hook = _train(ctx, data, on_step=rec)
    plain = _train(ctx, data)
    for a, b in zip(with_hook, plain, strict=True):  # the hook only reads: bitwise the same
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)

    chain = ctx.model_store.registry().shards[1].chain
    prev = None
    for r, vid in enumerate(chain):
        weights = ctx.model_store.load_state(vid)
        c = load_contributions(ctx.storage, ctx.layout, vid, expect=weights)
        m = ctx.model_store.manifest(vid)["metrics"]
        assert c.stage == r and c.steps == m["steps"] and c.dtype == torch.float32
        assert c.batch_sizes().sum() == m["samples_seen"]
        assert np.isin(c.ids, ctx.model_store.sample_ids(vid)).all()
        if prev is not None:  # a snapshot is its parent plus its stage's updates
            total = c.total()
            assert _close({k: prev[k] + total[k] for k in prev}, weights)
        prev = weights
        # float16 round trip through storage: bit-exact
        c16 = rec.take(r, state_digest(with_hook[r].state))
        save_contributions(ctx.storage, ctx.layout, "roundtrip", c16)
        back = load_contributions(ctx.storage, ctx.layout, "roundtrip")
        assert back.dtype == torch.float16 and back.digest == c16.digest
        assert np.array_equal(back.offsets, c16.offsets) and np.array_equal(back.ids, c16.ids)
        assert all(torch.equal(back.deltas[k], c16.deltas[k]) for k in c16.deltas)
    p = contribution_path(ctx.layout, chain[0])
    assert p == f"{ctx.layout.version_dir(chain[0])}/contributions.safetensors"
    assert ctx.storage.exists(p) and has_contributions(ctx.storage, ctx.layout, chain[0])
    with pytest.raises(MissingContributions, match="other weights"):
        load_contributions(ctx.storage, ctx.layout, chain[0], expect=prev)


# -- DPUS -------------------------------------------------------------------------------------


def _toy_sgd(x, y, order, lr, batch, deleted=()):
    """Plain SGD (no momentum) on the loss -y * w.x: each sample's gradient -y x does not
    depend on w, so every update is additive. Returns (w, recorder)."""
    w = torch.zeros(x.shape[1])
    rec = ContributionRecorder("float32")
    order = [i for i in order if i not in set(deleted)]
    for step, i0 in enumerate(range(0, len(order), batch)):
        b = order[i0 : i0 + batch]
        grad = -(y[b, None] * x[b]).mean(0)
        before = {"w": w.clone()}
        w = w - lr * grad
        rec(0, step, np.asarray(b), before, {"w": w})
    return w, rec


def test_dpus_means_removing_the_batches_updates_exactly():
    """With additive updates (gradients independent of the weights, no optimizer state) and
    the deleted sample alone in its batches, subtracting the recorded updates of its batches
    ("batch") is exactly training without it. Otherwise DPUS is W' = W - (removed updates):
    a first-order approximation of retraining."""
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 4.0], [2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1.0, -1.0, 1.0, -1.0])
    order = [2, 0, 3, 1, 0, 1, 2, 3]  # two passes
    w, rec = _toy_sgd(x, y, order, lr=0.5, batch=1)
    c = rec.take(0)
    assert torch.equal(c.total()["w"], w)  # W_T = W_0 + sum of the updates (W_0 = 0)
    removed, rest, touched = c.without([0], "batch")
    w_retrained, _ = _toy_sgd(x, y, order, lr=0.5, batch=1, deleted=[0])
    assert touched == 2 and rest.steps == 6 and 0 not in rest.ids
    assert torch.equal(w - removed["w"], w_retrained)  # DPUS == retraining, bit for bit
    # What DPUS does numerically: W' = W - sum of the removed steps' deltas.
    assert torch.equal(removed["w"], c.deltas["w"][0 + 1] + c.deltas["w"][4])

    # share: batches of two; sample 0 shares batches 0 ({2, 0}) and 2 ({0, 1}). "share" takes
    # the deleted samples' count / batch size of each such update (an estimate of their
    # part: exact when the batch's per-sample terms are equal) and keeps the rest.
    w2, rec2 = _toy_sgd(x, y, order, lr=0.5, batch=2)
    c2 = rec2.take(0)
    removed2, rest2, _ = c2.without([0], "share")
    assert torch.equal(removed2["w"], 0.5 * (c2.deltas["w"][0] + c2.deltas["w"][2]))
    # the touched steps were computed on sample 0's row: they leave the record whole; the
    # co-batched samples' part (the other half) stays in the weights, unrecorded
    kept = 0.5 * (c2.deltas["w"][0] + c2.deltas["w"][2])
    assert torch.equal(w2 - removed2["w"], rest2.total()["w"] + kept)
    assert 0 not in rest2.ids and rest2.steps == 2 and rest2.untracked.tolist() == [1, 2]
    assert torch.equal(rest2.deltas["w"], c2.deltas["w"][[1, 3]])
    with pytest.raises(MissingContributions, match="samples \\[2\\]"):
        rest2.without([2], "share")  # its step 0 update is gone from the record
    _, rest2b, _ = rest2.without([3], "share")  # untracked ones stay untracked
    assert rest2b.untracked.tolist() == [1, 2] and rest2b.steps == 0

    # share with a factor: f times the share, capped at the whole update (a step whose
    # whole update is gone is dropped, as with "batch", and leaves nothing untracked)
    removed3, rest3, _ = c2.without([0], "share", factor=1.5)
    assert torch.allclose(removed3["w"], 0.75 * (c2.deltas["w"][0] + c2.deltas["w"][2]))
    assert torch.allclose(w2 - removed3["w"], rest3.total()["w"] + 0.5 * kept)
    removed4, rest4, _ = c2.without([0], "share", factor=4.0)
    assert torch.equal(removed4["w"], c2.deltas["w"][0] + c2.deltas["w"][2])
    assert rest4.steps == 2 and 0 not in rest4.ids and not len(rest4.untracked)


def test_momentum_aware_dpus_removes_a_gradient_through_the_momentum():
    """Heavy-ball SGD (momentum 0.9): a step's update is mostly earlier gradients. The
    momentum-aware removal takes out the deleted sample's gradient on every step it reached,
    which (gradients independent of the weights) gives exactly the run in which its
    gradient was zero; the raw-step removal does not."""
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 4.0], [2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1.0, -1.0, 1.0, -1.0])
    order, lr, mu = [2, 0, 3, 1, 0, 1, 2, 3], 0.25, 0.9

    def run(zero=()):
        w, buf = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        rec = ContributionRecorder("float32")
        for step, i in enumerate(order):
            g = torch.zeros(3, dtype=torch.float64) if i in zero else -(y[i] * x[i]).double()
            buf = mu * buf + g
            before = {"w": w.clone()}
            w = w - lr * buf
            rec(0, step, np.asarray([i]), before, {"w": w})
        return w, rec.take(0)

    w, c = run()
    target, _ = run(zero=[0])
    removed, rest, touched = c.without([0], "batch", momentum=mu)
    assert touched == 2 and rest.steps == c.steps  # steps stay: they carry other gradients
    assert 0 not in rest.ids and rest.batch_sizes().tolist() == [1, 0, 1, 1, 0, 1, 1, 1]
    assert torch.allclose(w.float() - removed["w"], target.float(), atol=1e-5)
    assert torch.allclose(w.float() - removed["w"], rest.total()["w"], atol=1e-5)
    raw, _, _ = c.without([0], "batch")  # the raw steps: not the same thing
    assert not torch.allclose(w.float() - raw["w"], target.float(), atol=1e-2)
    # a later removal from what is kept is the same as removing both at once
    both, _, _ = c.without([0, 3], "batch", momentum=mu)
    later, _, _ = rest.without([3], "batch", momentum=mu)
    assert torch.allclose(removed["w"] + later["w"], both["w"], atol=1e-5)


@pytest.mark.parametrize("scale", ["share", "batch"])
def test_dpus_strategy_on_a_shard(recorded_run, scale):
    ctx = recorded_run
    hy = ctx.config.hybrid
    hy.dpus_scale = scale
    shard = 2
    state = _state(ctx, shard)
    owner = _owner_in(ctx, shard, slice_=1)
    deleted = ctx.plan.samples_of_owner(owner)
    update = get_strategy("dpus")(ctx).unlearn_shard(state, deleted)
    assert update.first_stage == 1 and not update.exact
    expect_removed = None
    for st in update.stages:
        c = load_contributions(ctx.storage, ctx.layout, state.chain[st.stage])
        removed, _, _ = c.without(deleted, scale, factor=hy.dpus_share_factor)
        expect_removed = (
            removed
            if expect_removed is None
            else {k: expect_removed[k] + removed[k] for k in removed}
        )
        old = state.snapshots[st.stage]
        assert _close(st.state, {k: old[k] - expect_removed[k] for k in old}, atol=0)
        assert not np.isin(deleted, st.sample_ids).any() and st.metrics["exact"] == 0.0
    assert update.stages[-1].metrics["hybrid_exact_decision"] == 0.0


@pytest.mark.parametrize("momentum", [False, True])
def test_dpus_through_the_engine_keeps_the_chain_consistent(recorded_run, momentum):
    ctx = recorded_run
    ctx.config.hybrid.dpus_momentum = momentum
    shard = 0
    eng = UnlearningEngine(ctx, LocalShards(ctx))
    a, b = _owner_in(ctx, shard, 0), _owner_in(ctx, shard, 0, skip=1)
    ctx.config.hybrid.threshold = 1.0  # hs: exact (it records, unlike plain sisa)
    eng.submit(owner_id=a, request_id="a")
    (ra,) = eng.execute_pending(strategy="hs")
    assert ra.details["strategy"] == "hs" and ra.details["exact"]
    eng.submit(owner_id=b, request_id="b")
    (rb,) = eng.execute_pending(strategy="dpus")
    assert rb.details["strategy"] == "dpus" and rb.details["exact"] is False
    assert audit(ctx)["clean"] and audit(ctx, owner_id=b)["live_versions_containing"] == {}
    first_b = rb.details["first_slices"][str(shard)]
    chain = ctx.model_store.registry().shards[shard].chain
    # the log says what was decided and why; the audit names the approximate versions
    info = rb.details["strategy_info"][str(shard)]
    assert info["decision"] == "dpus" and info["actual_seconds"] > 0
    assert info["retrain_seconds"] is None and info["predicted_seconds"] > 0
    ia = ra.details["strategy_info"][str(shard)]
    assert ia["decision"] == "exact" and ia["retrain_seconds"] > 0  # the estimator's error
    assert ia["predicted_seconds"] <= ia["threshold_seconds"]
    a_b = audit(ctx, owner_id=b)
    assert a_b["exact"] is False and set(a_b["approximate_live_versions"]) == set(chain)
    assert [r["exact"] for r in a_b["requests"]] == [False]
    assert chain_exactness(ctx, chain) == [False] * len(chain)  # slice 0 was hit
    for r, vid in enumerate(chain):
        m = ctx.model_store.manifest(vid)
        assert m["metrics"]["exact"] == 0.0 and m["created_by"] == "b"
        w = ctx.model_store.load_state(vid)
        c = load_contributions(ctx.storage, ctx.layout, vid, expect=w)
        assert not np.isin(ctx.plan.samples_of_owner(b), c.ids).any()
        if r and (momentum or not len(c.untracked)):
            total, prev = c.total(), ctx.model_store.load_state(chain[r - 1])
            assert _close({k: prev[k] + total[k] for k in prev}, w, atol=1e-4)
        if not momentum:  # the touched steps left the record; their other samples are listed
            assert not np.isin(c.untracked, ctx.plan.samples_of_owner(b)).any()
            assert r < first_b or len(c.untracked)


def test_dpus_needs_recorded_contributions(tmp_path):
    ctx = create_run(tiny_config(tmp_path, "training.torch_threads=1"))
    train_all_shards(ctx)  # without recording
    state = _state(ctx, 1)
    deleted = ctx.plan.samples_of_owner(_owner_in(ctx, 1))
    with pytest.raises(MissingContributions, match="hybrid.record=true"):
        get_strategy("dpus")(ctx).unlearn_shard(state, deleted)
    update = get_strategy("hs")(ctx).unlearn_shard(state, deleted)  # falls back to exact
    assert update.exact and update.stages[-1].metrics["hybrid_no_contributions"] == 1.0


# -- estimator and decision -------------------------------------------------------------------


def test_stage_samples_match_stage_batches():
    for n_rows, steps, batch in [(50, 7, 16), (50, 4, 16), (10, 3, 32), (33, 9, 8), (5, 0, 4)]:
        seen = sum(len(b) for b in stage_batches(n_rows, steps, batch, 0, 0, 0))
        assert stage_samples(n_rows, steps, batch) == seen
    steps, samples, per = retrain_work([10, 0, 6], 1, epochs=3, batch_size=4)
    assert per == [0, 5] and steps == 5 and samples == stage_samples(16, 5, 4)


def test_estimator_matches_the_actual_retraining(recorded_run):
    ctx = recorded_run
    shard = 1
    deleted = ctx.plan.samples_of_owner(_owner_in(ctx, shard, 1))
    est = estimate_workload(ctx, {shard: deleted}, samples_per_second=1000.0)
    update = get_strategy("sisa")(ctx).unlearn_shard(_state(ctx, shard), deleted)
    w = est.shards[shard]
    assert w.first_slice == update.first_stage == 1
    assert w.steps == sum(s.metrics["steps"] for s in update.stages)
    assert w.samples == sum(s.metrics["samples_seen"] for s in update.stages)
    assert w.seconds == pytest.approx(w.samples / 1000.0)
    # full retrain of every shard from slice 0 (after the deletion)
    full = sum(
        sum(s.metrics["samples_seen"] for s in _train(ctx, ctx.shard_data(k, exclude=deleted)))
        for k in range(ctx.config.partition.shards)
    )
    assert est.full_samples == full
    # the default throughput comes from the run's own stage metrics
    auto = estimate_workload(ctx, {shard: deleted})
    assert 0 < auto.samples_per_second < float("inf")


def test_hs_decision_switches_at_the_threshold(recorded_run):
    ctx = recorded_run
    hy = ctx.config.hybrid
    est = WorkloadEstimate({}, 100.0, full_seconds=10.0)
    from ray_unlearn.platform.methods.hybrid.workload import ShardWorkload

    est.shards[0] = ShardWorkload(0, 1, 20, 250, 2.5)
    hy.threshold_unit, hy.threshold = "seconds", 2.5
    assert decide(hy, est, 0).exact  # predicted <= threshold: exact
    hy.threshold = 2.49
    assert not decide(hy, est, 0).exact
    hy.threshold_unit, hy.threshold = "fraction", 0.25  # 0.25 * 10 s
    assert decide(hy, est, 0).exact and decide(hy, est, 0).threshold_seconds == 2.5
    hy.threshold = 0.24
    assert not decide(hy, est, 0).exact

    # end to end: the same request goes exact or DPUS around its own prediction
    shard = 1
    deleted = ctx.plan.samples_of_owner(_owner_in(ctx, shard, 1))
    state = _state(ctx, shard)
    frac = estimate_workload(ctx, {shard: deleted}, deleted_before=[])
    at = frac.shards[shard].seconds / frac.full_seconds
    hy.threshold = at * 1.0001
    exact = get_strategy("hs")(ctx).unlearn_shard(state, deleted)
    hy.threshold = at * 0.9999
    approx = get_strategy("hs")(ctx).unlearn_shard(state, deleted)
    assert exact.exact and exact.stages[-1].metrics["hybrid_exact_decision"] == 1.0
    assert not approx.exact and approx.stages[-1].metrics["hybrid_exact_decision"] == 0.0
    m = exact.stages[-1].metrics
    assert m["hybrid_predicted_seconds"] <= m["hybrid_threshold_seconds"]
    assert m["hybrid_actual_seconds"] > 0
    sisa = get_strategy("sisa")(ctx).unlearn_shard(state, deleted)
    for a, b in zip(exact.stages, sisa.stages, strict=True):  # HS's exact path is SISA
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_exact_retrain_from_an_approximate_snapshot_is_not_exact(recorded_run):
    ctx = recorded_run
    shard = 0
    eng = UnlearningEngine(ctx, LocalShards(ctx))
    eng.submit(owner_id=_owner_in(ctx, shard, 1), request_id="approx")
    eng.execute_pending(strategy="dpus")  # stages 1.. approximate
    ctx.config.hybrid.threshold = 1.0  # every request light: exact
    eng.submit(owner_id=_owner_in(ctx, shard, 2), request_id="later")
    (later,) = eng.execute_pending(strategy="hs")
    assert later.details["exact"] is False  # restarted from the approximate stage 1
    eng.submit(owner_id=_owner_in(ctx, shard, 0), request_id="early")
    (early,) = eng.execute_pending(strategy="hs")
    assert early.details["exact"] is True  # from slice 0: the shard is exact again
    chain = ctx.model_store.registry().shards[shard].chain
    assert chain_exactness(ctx, chain) == [True] * len(chain)
    assert audit(ctx)["approximate_live_versions"] == [] and audit(ctx)["exact"]


def test_ohs_fine_tunes_the_serving_stage_and_records_it(recorded_run):
    ctx = recorded_run
    ctx.config.hybrid.threshold = 0.0  # always DPUS
    ctx.config.hybrid.ohs_slices = "all"
    shard = 2
    state = _state(ctx, shard)
    deleted = ctx.plan.samples_of_owner(_owner_in(ctx, shard, 0))
    dpus = get_strategy("dpus")(ctx).unlearn_shard(state, deleted)
    update = get_strategy("ohs")(ctx).unlearn_shard(state, deleted)  # (same version ids)
    assert not update.exact and update.first_stage == 0
    for a, b in zip(update.stages[:-1], dpus.stages[:-1], strict=True):  # restart points: DPUS
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    m = update.stages[-1].metrics
    assert m["ohs_finetune_steps"] > 0 and m["ohs_val_loss_after"] < m["ohs_val_loss_before"]
    gen = int(state.chain[-1].rsplit("-g", 1)[1]) + 1
    vid = f"s{shard:03d}-r{len(state.chain) - 1:02d}-g{gen:04d}"
    c = load_contributions(ctx.storage, ctx.layout, vid, expect=update.stages[-1].state)
    assert c.steps == m["dpus_kept_steps"] + m["ohs_finetune_steps"]
    assert not np.isin(deleted, c.ids).any()


# -- registry and config ----------------------------------------------------------------------


def test_strategies_are_registered_and_selected_by_config(tmp_path):
    assert {"dpus", "hs", "ohs", "sisa"} <= set(available_strategies())
    assert not get_strategy("dpus").exact and get_strategy("sisa").exact
    with pytest.raises(ConfigError, match="hybrid.record=true"):
        load_config(None, ["unlearning.strategy=ohs"])
    ctx = create_run(tiny_config(tmp_path, *REC, "unlearning.strategy=hs", "hybrid.threshold=0"))
    train_and_record(ctx)
    owner = str(np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])[0])
    rec = UnlearningEngine(ctx, LocalShards(ctx)).forget(owner_id=owner)
    assert rec.details["strategy"] == "hs" and rec.details["exact"] is False
    assert ctx.model_store.manifest(rec.versions_created[-1])["metrics"]["exact"] == 0.0


def test_hybrid_config_validation():
    cfg = load_config(
        None,
        [*REC, "hybrid.dtype=bfloat16", "hybrid.threshold_unit=seconds", "hybrid.threshold=30"],
    )
    assert cfg.hybrid.dtype == "bfloat16" and cfg.hybrid.threshold == 30
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            [
                "hybrid.dtype=int8",
                "hybrid.threshold=-1",
                "hybrid.ohs_validation_fraction=1",
                "hybrid.ohs_slices=first",
                "hybrid.colour=red",
            ],
        )
    msg = str(e.value)
    assert "5 problem(s)" in msg
    for field in (
        "hybrid.dtype",
        "hybrid.threshold",
        "hybrid.ohs_validation_fraction",
        "hybrid.ohs_slices",
        "hybrid.colour",
    ):
        assert field in msg
    with pytest.raises(ConfigError, match="fraction of a full retrain"):
        load_config(None, ["hybrid.threshold=2"])


def test_plain_training_is_unchanged_by_the_hybrid_section(tmp_path):
    """A run without recording trains as before (same weights as one that records), and
    ``train_all_shards`` records contributions beside every version when hybrid.record."""
    a = create_run(tiny_config(tmp_path / "a", "training.torch_threads=1"))
    b = create_run(tiny_config(tmp_path / "b", *REC))
    train_all_shards(a)
    train_all_shards(b)  # hybrid.record=true: records (what `ray-unlearn train` runs locally)
    for k in range(a.config.partition.shards):
        ca = a.model_store.registry().shards[k].chain
        cb = b.model_store.registry().shards[k].chain
        assert (
            a.model_store.manifest(ca[-1])["weights_sha256"]
            == b.model_store.manifest(cb[-1])["weights_sha256"]
        )
        assert not any(has_contributions(a.storage, a.layout, v) for v in ca)
        for v in cb:  # usable by DPUS: they lead to the stored weights
            load_contributions(b.storage, b.layout, v, expect=b.model_store.load_state(v))


def test_optimizer_momentum_comes_from_the_training_optimizer():
    assert optimizer_momentum(load_config(None).training) == (0.9, True)  # Adam beta1
    assert optimizer_momentum(load_config(None, ["training.optimizer=sgd"]).training) == (
        0.9,
        False,
    )


def test_stage_contributions_reject_inconsistent_shapes():
    with pytest.raises(ValueError, match="inconsistent"):
        StageContributions(0, {"w": torch.zeros(2, 3)}, np.array([0, 1]), np.array([5]))


# -- forget calibration -------------------------------------------------------------------------


def test_quantile_targets_keep_the_order_and_take_reference_quantiles():
    from ray_unlearn.platform.methods.hybrid.calibration import quantile_targets

    ref = torch.arange(101, dtype=torch.float32) / 100  # quantile q is q itself
    got = quantile_targets(torch.tensor([0.9, 0.1, 0.5, 0.2]), ref)
    # ranks 3, 0, 2, 1 of 4 -> quantiles (r + 0.5) / 4
    assert torch.allclose(got, torch.tensor([0.875, 0.125, 0.625, 0.375]))
    assert torch.allclose(quantile_targets(torch.tensor([0.01]), ref), torch.tensor([0.5]))


def test_nonmember_reference_is_other_shards_minus_the_deleted(recorded_run):
    from ray_unlearn.platform.methods.hybrid.calibration import nonmember_reference

    ctx = recorded_run
    plan = ctx.plan
    others = plan.sample_ids[(plan.shards != TEST) & (plan.shards != 1)]
    gone = others[:7]
    x, y = nonmember_reference(ctx, 1, gone, rows=10_000, seed=0)
    assert len(y) == len(others) - 7
    want = ctx.records.index_of(np.setdiff1d(others, gone))
    assert torch.equal(y, torch.from_numpy(ctx.records.labels[want].astype(np.int64)))
    xs, _ = nonmember_reference(ctx, 1, gone, rows=20, seed=0)
    assert 5 < len(xs) < 40  # a hashed ~20 of them
    again, _ = nonmember_reference(ctx, 1, gone, rows=20, seed=0)
    assert torch.equal(xs, again)


def _kl(ctx, teacher, x, st) -> float:
    """KL(teacher || model) on rows ``x``, batch mean."""
    import torch.nn.functional as F

    from ray_unlearn.platform.core.models import build_model

    model = build_model(ctx.config.model, ctx.feature_shape, ctx.num_classes)
    model.load_state_dict(st)
    model.eval()
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(model(x), 1), teacher, reduction="batchmean"))


def _losses(ctx, data, st, deleted):
    from ray_unlearn.platform.core.models import build_model
    from ray_unlearn.platform.methods.hybrid.calibration import _per_sample_loss

    model = build_model(ctx.config.model, ctx.feature_shape, ctx.num_classes)
    model.load_state_dict(st)
    gone = np.isin(data.sample_ids, deleted)
    rows, keep = torch.from_numpy(np.flatnonzero(gone)), torch.from_numpy(np.flatnonzero(~gone))
    return (
        _per_sample_loss(model, data.features[rows], data.labels[rows]).mean(),
        _per_sample_loss(model, data.features[keep], data.labels[keep]).mean(),
    )


@pytest.mark.parametrize(
    "strategy,target", [("dpus", "quantile"), ("ohs", "quantile"), ("dpus", "teacher")]
)
def test_calibration_raises_the_revoked_rows_loss_and_is_recorded(recorded_run, strategy, target):
    ctx = recorded_run
    hy = ctx.config.hybrid
    hy.threshold = 0.0  # always DPUS
    hy.calibrate_target, hy.calibrate_depth = target, None  # every corrected snapshot
    shard = 2
    state = _state(ctx, shard)
    deleted = ctx.plan.samples_of_owner(_owner_in(ctx, shard, 1))  # stages 1.. corrected
    plain = get_strategy(strategy)(ctx).unlearn_shard(state, deleted)
    hy.calibrate_forget = True
    update = get_strategy(strategy)(ctx).unlearn_shard(state, deleted)
    assert update.first_stage == 1 and len(update.stages) == len(state.chain) - 1
    for st in update.stages:  # every corrected snapshot, the restart points included
        m = st.metrics
        # every revoked row reached its target (rows already above it get no push and may
        # drift down a little), unless the step cap ended it
        assert m["calibrate_reached"] or m["calibrate_steps"] == 100
    assert update.stages[0].metrics["calibrate_steps"] > 0  # a restart point was calibrated
    want_teachers = ctx.plan.num_shards - 1 if target == "teacher" else 0
    assert all(st.metrics["calibrate_teachers"] == want_teachers for st in update.stages)
    f_plain, r_plain = _losses(ctx, state.data, plain.stages[-1].state, deleted)
    f_cal, r_cal = _losses(ctx, state.data, update.stages[-1].state, deleted)
    assert r_cal < r_plain + 0.5  # the rest kept
    if target == "quantile":  # (a teacher may want either direction: its own test below)
        assert f_cal > f_plain  # forgotten more
    # The calibration is one recorded step per snapshot with no sample ids (its steps held
    # gradients of the revoked rows), and the chain still adds up from the kept parent:
    # W'_r = W'_{r-1} + sum(contributions_r).
    gen = int(state.chain[-1].rsplit("-g", 1)[1]) + 1
    prev, prev_took = state.snapshots[0], False
    for st, dp in zip(update.stages, plain.stages, strict=True):
        vid = f"s{shard:03d}-r{st.stage:02d}-g{gen:04d}"
        c = load_contributions(ctx.storage, ctx.layout, vid, expect=st.state)
        m = st.metrics
        took = bool(m["calibrate_steps"])
        extra = 1 if took or prev_took else 0  # its own change minus the previous one's
        assert c.steps == m["dpus_kept_steps"] + m.get("ohs_finetune_steps", 0) + extra
        if extra:
            assert len(c.batch_ids(c.steps - 1)) == 0
        assert not np.isin(deleted, c.ids).any()
        if not len(c.untracked):  # else the dropped steps' retained part is unrecorded
            assert _close({k: prev[k] + c.total()[k] for k in prev}, st.state, atol=1e-4)
        if not took and strategy == "dpus":  # calibrated independently: nothing carried in
            assert _close(st.state, dp.state, atol=0)
        prev, prev_took = st.state, took


def test_calibrating_the_serving_snapshot_only(recorded_run):
    ctx = recorded_run
    hy = ctx.config.hybrid
    shard = 2
    state = _state(ctx, shard)
    deleted = ctx.plan.samples_of_owner(_owner_in(ctx, shard, 0))
    plain = get_strategy("dpus")(ctx).unlearn_shard(state, deleted)
    hy.calibrate_forget, hy.calibrate_depth = True, 1
    update = get_strategy("dpus")(ctx).unlearn_shard(state, deleted)
    for a, b in zip(update.stages[:-1], plain.stages[:-1], strict=True):  # restart points: DPUS
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
        assert "calibrate_steps" not in a.metrics
    assert update.stages[-1].metrics["calibrate_steps"] > 0


def test_a_later_dpus_works_on_a_calibrated_shard(recorded_run):
    ctx = recorded_run
    ctx.config.hybrid.threshold = 0.0
    ctx.config.hybrid.calibrate_forget = True
    shard = 1
    eng = UnlearningEngine(ctx, LocalShards(ctx))
    # whole-batch DPUS: a share DPUS leaves the other samples of its touched steps untracked,
    # and a later one for them is refused (test_a_sample_whose_step_left_the_record_...)
    ctx.config.hybrid.dpus_scale = "batch"
    for i, owner in enumerate([_owner_in(ctx, shard, 0), _owner_in(ctx, shard, 0, skip=1)]):
        eng.submit(owner_id=owner, request_id=f"r{i}")
        (rec,) = eng.execute_pending(strategy="dpus")
        assert rec.state.value == "done", rec.details
    chain = ctx.model_store.registry().shards[shard].chain
    for r, vid in enumerate(chain):
        w = ctx.model_store.load_state(vid)
        assert all(torch.isfinite(v).all() for v in w.values())
        c = load_contributions(ctx.storage, ctx.layout, vid, expect=w)
        if r:
            prev = ctx.model_store.load_state(chain[r - 1])
            assert _close({k: prev[k] + c.total()[k] for k in prev}, w, atol=1e-4)
    assert audit(ctx)["clean"]


def test_requested_ids_include_requests_not_yet_done(recorded_run):
    ctx = recorded_run
    eng = UnlearningEngine(ctx, LocalShards(ctx))
    a, b = _owner_in(ctx, 0), _owner_in(ctx, 1)
    eng.submit(owner_id=a, request_id="a")  # pending
    log = ctx.deletion_log
    assert set(ctx.plan.samples_of_owner(a).tolist()) <= log.requested_sample_ids()
    assert not log.deleted_sample_ids()
    eng.submit(owner_id=b, request_id="b")
    want = set(np.concatenate([ctx.plan.samples_of_owner(o) for o in (a, b)]).tolist())
    assert log.requested_sample_ids() == want


def test_dpus_is_refused_before_logging_where_a_version_has_no_contributions(recorded_run):
    from ray_unlearn.platform.methods import check_request as _check_strategy

    ctx = recorded_run
    shard = 2
    eng = UnlearningEngine(ctx, LocalShards(ctx))
    eng.submit(owner_id=_owner_in(ctx, shard, 0), request_id="x")
    eng.execute_pending(strategy="sisa")  # an exact retrain that records nothing
    later = _owner_in(ctx, shard, 0, skip=1)
    with pytest.raises(ValueError, match="no recorded contributions"):
        _check_strategy(ctx, "dpus", later)
    _check_strategy(ctx, "hs", later)  # hs retrains such a shard exactly
    _check_strategy(ctx, "dpus", _owner_in(ctx, 0))  # another shard still has them
    with pytest.raises(ValueError, match="was not trained with S3T"):
        _check_strategy(ctx, "s3t", later)
    with pytest.raises(ValueError, match="unknown strategy"):
        _check_strategy(ctx, "nope", later)


def test_calibration_stops_at_the_targets(recorded_run):
    from ray_unlearn.platform.methods.hybrid.calibration import (
        calibrate_forget,
        nonmember_reference,
    )

    ctx = recorded_run
    cfg = ctx.config
    data = ctx.shard_data(0)
    state = ctx.model_store.load_state(ctx.model_store.registry().shards[0].chain[-1])
    forget = np.flatnonzero(np.isin(data.sample_ids, data.sample_ids[:3]))
    kw = dict(
        model_cfg=cfg.model,
        train_cfg=cfg.training,
        feature_shape=ctx.feature_shape,
        num_classes=ctx.num_classes,
        lr=None,
        seed_parts=(0, 0, 1),
    )
    ref = nonmember_reference(ctx, 0, data.sample_ids[:3], 512, 0)
    res = calibrate_forget(state, data, forget, np.arange(3, len(data)), ref, max_steps=500, **kw)
    assert res.reached and 0 < res.steps < 500
    assert res.forget_loss_after >= res.forget_loss_before
    none = calibrate_forget(state, data, forget, np.arange(3, len(data)), ref, max_steps=0, **kw)
    assert none.steps == 0 and none.state is state
    half = calibrate_forget(
        state, data, forget, np.arange(3, len(data)), ref, max_steps=500, fraction=0.5, **kw
    )
    assert half.reached and 0 < half.steps <= res.steps
    assert res.forget_loss_before < half.forget_loss_after
    # only the chosen part of the model moves
    for part, still in (("body", "head."), ("head", "body.")):
        got = calibrate_forget(
            state, data, forget, np.arange(3, len(data)), ref, max_steps=500, params=part, **kw
        )
        assert got.steps > 0 and got.forget_loss_after > got.forget_loss_before
        for k in state:
            same = torch.equal(got.state[k], state[k])
            assert same == k.startswith(still), k
    with pytest.raises(ValueError, match="unknown calibration params 'bias'"):
        calibrate_forget(state, data, forget, np.arange(3, len(data)), ref, max_steps=5,
                         params="bias", **kw)  # fmt: skip


# -- calibration toward the other shards' models (calibrate_target=teacher) ---------------------


def test_teacher_shards_leave_out_every_shard_holding_the_same_person(tmp_path):
    from ray_unlearn.platform.methods.hybrid.calibration import teacher_shards

    ctx = create_run(tiny_config(tmp_path, "partition.group_by=sample"))
    plan = ctx.plan
    trained = plan.shards != TEST
    # an owner whose samples landed in two shards (sample-grouped plans scatter them)
    for owner in np.unique(plan.owner_ids[trained]):
        held = np.unique(plan.locate(plan.samples_of_owner(owner))[0])
        held = held[held != TEST]
        if len(held) >= 2:
            break
    else:
        pytest.skip("no owner spans two shards in this plan")
    ids = plan.samples_of_owner(owner)
    k, _ = plan.locate(ids)
    shard = int(k[k != TEST][0])
    got = teacher_shards(ctx, shard, ids[k == shard][:1])
    assert shard not in got and not set(held.tolist()) & set(got)
    assert sorted(got + held.tolist()) == list(range(plan.num_shards))


def test_teacher_probabilities_average_the_other_shards_and_skip_requested_ids(recorded_run):
    from ray_unlearn.platform.core.models import build_model
    from ray_unlearn.platform.core.training import predict_proba
    from ray_unlearn.platform.methods.hybrid.calibration import (
        teacher_probabilities,
        teacher_shards,
    )

    ctx = recorded_run
    owner = _owner_in(ctx, 0, 0)
    ids = ctx.plan.samples_of_owner(owner)
    shards = teacher_shards(ctx, 0, ids)
    assert shards == [1, 2]  # owner-grouped: every other shard
    data = ctx.shard_data(0)
    x = data.features[torch.from_numpy(np.flatnonzero(np.isin(data.sample_ids, ids)))]
    reg = ctx.model_store.registry()
    model = build_model(ctx.config.model, ctx.feature_shape, ctx.num_classes)
    want = []
    for k in shards:
        model.load_state_dict(ctx.model_store.load_state(reg.shards[k].chain[1]))
        want.append(predict_proba(model, x))
    got, n = teacher_probabilities(ctx, shards, 1, x)
    assert n == 2 and torch.allclose(got, (want[0] + want[1]) / 2, atol=1e-6)
    # a shard whose stage-1 model holds a requested (not yet deleted) id is no teacher
    pending = ctx.model_store.sample_ids(reg.shards[1].chain[1])[:1]
    got, n = teacher_probabilities(ctx, shards, 1, x, exclude_ids=pending)
    assert n == 1 and torch.allclose(got, want[1], atol=1e-6)
    both = np.concatenate([pending, ctx.model_store.sample_ids(reg.shards[2].chain[0])[:1]])
    assert teacher_probabilities(ctx, shards, 1, x, exclude_ids=both) == (None, 0)


def test_calibration_toward_a_teacher_moves_the_rows_to_its_prediction(recorded_run):
    from ray_unlearn.platform.methods.hybrid.calibration import calibrate_forget

    ctx = recorded_run
    cfg = ctx.config
    data = ctx.shard_data(0)
    state = ctx.model_store.load_state(ctx.model_store.registry().shards[0].chain[-1])
    forget = np.arange(4)
    xf, yf = data.features[:4], data.labels[:4]
    # a teacher sure of another class: far from what the member model predicts
    c = ctx.num_classes
    teacher = torch.full((4, c), 0.1 / (c - 1))
    teacher[torch.arange(4), (yf + 1) % c] = 0.9
    kw = dict(
        model_cfg=cfg.model,
        train_cfg=cfg.training,
        feature_shape=ctx.feature_shape,
        num_classes=c,
        lr=None,
        seed_parts=(0, 0, 2),
    )
    empty = (torch.empty(0, *xf.shape[1:]), torch.empty(0, dtype=torch.int64))
    retain = np.arange(4, len(data))
    res = calibrate_forget(state, data, forget, retain, empty, max_steps=300, teacher=teacher, **kw)
    assert 0 < res.steps <= 300
    assert _kl(ctx, teacher, xf, res.state) < 0.5 * _kl(ctx, teacher, xf, state)
    assert res.forget_loss_after > res.forget_loss_before
    assert res.target_loss == pytest.approx(-float(np.log(0.1 / (c - 1))), rel=1e-5)
    with pytest.raises(ValueError, match="teacher probabilities have shape"):
        calibrate_forget(state, data, forget, retain, empty, max_steps=5, teacher=teacher[:3], **kw)


# -- memorization-aware routing (route_gap) ---------------------------------------------------


def test_memorization_gap_is_the_shard_model_minus_the_models_that_never_saw_the_rows(
    recorded_run,
):
    from ray_unlearn.platform.core.models import build_model
    from ray_unlearn.platform.core.training import predict_proba
    from ray_unlearn.platform.methods.hybrid.calibration import memorization_gap

    ctx = recorded_run
    ids = ctx.plan.samples_of_owner(_owner_in(ctx, 0, 0))
    state = _state(ctx, 0)
    rows = torch.from_numpy(np.flatnonzero(np.isin(state.data.sample_ids, ids)))
    x, y = state.data.features[rows], state.data.labels[rows]
    reg = ctx.model_store.registry()
    model = build_model(ctx.config.model, ctx.feature_shape, ctx.num_classes)

    def p_true(vid) -> float:
        model.load_state_dict(ctx.model_store.load_state(vid))
        return float(predict_proba(model, x)[torch.arange(len(y)), y].mean())

    own = p_true(state.chain[-1])
    others = [p_true(reg.shards[k].chain[-1]) for k in (1, 2)]  # serving stage of the others
    gap = memorization_gap(ctx, state.snapshots[-1], state.data, ids)
    assert gap.teachers == 2
    assert gap.shard_probability == pytest.approx(own, abs=1e-6)
    # the mean over models of the mean over rows: the same as the rows' mean of the average
    assert gap.teacher_probability == pytest.approx(sum(others) / 2, abs=1e-6)
    assert gap.gap == pytest.approx(own - sum(others) / 2, abs=1e-6)
    # no qualifying stand-in (each holds a requested id): no gap, so nothing is routed on it
    held = [ctx.model_store.sample_ids(reg.shards[k].chain[-1])[:1] for k in (1, 2)]
    none = memorization_gap(
        ctx, state.snapshots[-1], state.data, ids, exclude_ids=np.concatenate(held)
    )
    assert none.teachers == 0 and np.isnan(none.gap)


@pytest.mark.parametrize("name", ["hs", "ohs"])
def test_route_gap_retrains_remembered_rows_exactly(recorded_run, name):
    ctx = recorded_run
    hy = ctx.config.hybrid
    hy.threshold_unit, hy.threshold = "seconds", 0.0  # the workload rule alone: DPUS
    from ray_unlearn.platform.methods.hybrid.calibration import memorization_gap

    shard = 1
    state = _state(ctx, shard)
    for skip in range(20):  # an owner the (barely trained) tiny model fits better than the others
        deleted = ctx.plan.samples_of_owner(_owner_in(ctx, shard, 1, skip))
        if memorization_gap(ctx, state.snapshots[-1], state.data, deleted).gap > 0.001:
            break
    else:
        pytest.fail("no owner of shard 1 whose rows its model fits better than the others do")
    hy.route_gap = 0.0  # any positive gap routes
    routed = get_strategy(name)(ctx).unlearn_shard(state, deleted)
    m = routed.stages[-1].metrics
    assert routed.exact and routed.info["decision"] == "exact"
    assert routed.info["reason"] == "memorized" and m["hybrid_memorization_gap"] > 0
    assert m["hybrid_gap_teachers"] == 2
    sisa = get_strategy("sisa")(ctx).unlearn_shard(state, deleted)
    for a, b in zip(routed.stages, sisa.stages, strict=True):  # routed: SISA's retrain
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    hy.route_gap = 1.0  # a gap is a difference of probabilities: never above 1
    kept = get_strategy(name)(ctx).unlearn_shard(state, deleted)
    assert not kept.exact and kept.info["decision"] == "dpus"
    assert kept.stages[-1].metrics["hybrid_memorization_gap"] == m["hybrid_memorization_gap"]
    hy.route_gap = None  # off: the gap is not even computed
    plain = get_strategy(name)(ctx).unlearn_shard(state, deleted)
    assert not plain.exact and "hybrid_memorization_gap" not in plain.stages[-1].metrics


def test_dpus_ignores_route_gap(recorded_run):
    ctx = recorded_run
    ctx.config.hybrid.route_gap = 0.0
    deleted = ctx.plan.samples_of_owner(_owner_in(ctx, 1, 1))
    update = get_strategy("dpus")(ctx).unlearn_shard(_state(ctx, 1), deleted)
    assert not update.exact and update.info["decision"] == "dpus"


def test_route_gap_is_validated(tmp_path):
    for bad in ("-0.1", "1.5"):
        with pytest.raises(ConfigError, match="route_gap"):
            load_config(None, [f"storage={tmp_path}", f"hybrid.route_gap={bad}"])


# -- contributions storage: index + updates, linked when a DPUS only rescales ---------------


def _toy_contributions(dtype: str = "float16") -> StageContributions:
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 4.0], [2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1.0, -1.0, 1.0, -1.0])
    _, rec = _toy_sgd(x, y, [2, 0, 3, 1, 0, 1, 2, 3], lr=0.5, batch=2)
    rec_dtype = ContributionRecorder(dtype)
    c = rec.take(0)
    for t in range(c.steps):  # the same steps in the wanted dtype
        rec_dtype(0, t, c.batch_ids(t), {"w": torch.zeros(3)}, {"w": c.deltas["w"][t]})
    out = rec_dtype.take(0, "digest-0")
    return out


@pytest.mark.parametrize("root", ["local", "mock"])
def test_a_share_dpus_links_the_updates_and_keeps_the_arithmetic(tmp_path, root):
    from ray_unlearn.platform.core.storage import RunLayout, Storage

    storage = Storage(tmp_path if root == "local" else "mock:///root")
    layout = RunLayout("r")
    c = _toy_contributions()
    first = save_contributions(storage, layout, "v-g0", c)
    index_size = len(storage.read_bytes(contribution_path(layout, "v-g0")))
    assert first == index_size + len(c.updates_bytes())  # updates and index written
    back = load_contributions(storage, layout, "v-g0")
    assert all(torch.equal(back.deltas[k], c.deltas[k]) for k in c.deltas)
    assert back.scales is None and back.digest == "digest-0"

    # a DPUS that touches no step of a stage links its updates: only the index is written
    removed0, same, touched0 = back.without([99], "share")
    assert touched0 == 0 and same is back and not any(v.any() for v in removed0.values())
    same.digest = "digest-0b"
    assert save_contributions(storage, layout, "v-g0b", same) == len(
        storage.read_bytes(contribution_path(layout, "v-g0b"))
    )
    if root == "local":  # one file on disk, two names
        linked = load_contributions(storage, layout, "v-g0b")
        assert storage.local_path(back.source).stat().st_ino == (
            storage.local_path(linked.source).stat().st_ino
        )

    # sample 0: half of steps 0 ({2, 0}) and 2 ({0, 1}) is removed; both steps were computed
    # on its row, so they leave the stored updates whole, and samples 1 and 2 are untracked
    removed, rest, touched = back.without([0], "share")
    assert touched == 2 and rest.source is None and 0 not in rest.ids
    assert rest.steps == 2 and rest.untracked.tolist() == [1, 2]
    rest.digest = "digest-1"
    save_contributions(storage, layout, "v-g1", rest)
    again = load_contributions(storage, layout, "v-g1")
    assert torch.equal(again.deltas["w"], c.deltas["w"][torch.tensor([1, 3])])  # rewritten
    assert again.untracked.tolist() == [1, 2] and again.source != back.source
    kept = 0.5 * (c.deltas["w"][0].float() + c.deltas["w"][2].float())  # unrecorded now
    assert torch.allclose(again.total()["w"] + kept, c.total()["w"] - removed["w"], atol=1e-6)
    # a later request for a co-batched sample cannot be subtracted: it counts as missing
    with pytest.raises(MissingContributions, match="left the record"):
        again.without([2], "share")
    # retiring the first version takes its files; the linked updates live on in v-g0b
    assert purge_contributions(storage, layout, ["v-g0"]) == 1
    assert not has_contributions(storage, layout, "v-g0")
    assert torch.equal(load_contributions(storage, layout, "v-g0b").deltas["w"], c.deltas["w"])
    assert purge_contributions(storage, layout, ["v-g1", "v-g0b"]) == 2
    assert not storage.listdir(layout.version_dir("v-g1"))


def test_a_step_losing_its_whole_update_leaves_the_stored_updates(tmp_path):
    from ray_unlearn.platform.core.storage import RunLayout, Storage

    storage, layout = Storage(tmp_path), RunLayout("r")
    c = _toy_contributions()
    save_contributions(storage, layout, "v-g0", c)
    back = load_contributions(storage, layout, "v-g0")
    _, rest, _ = back.without([0], "batch")  # steps 0 and 2 go whole
    assert rest.steps == 2 and rest.source is None
    save_contributions(storage, layout, "v-g1", rest)
    again = load_contributions(storage, layout, "v-g1")
    assert again.source != back.source.replace("v-g0", "v-g1")  # a new updates file
    stored = again.deltas["w"]
    assert stored.shape[0] == 2
    assert torch.equal(stored, c.deltas["w"][torch.tensor([1, 3])])  # only what is left
    # scaled (as an earlier share DPUS left them), then joined with new steps (OHS
    # fine-tuning, calibration): the stored steps stay linked, the new ones go into the index
    scaled = StageContributions(
        0, back.deltas, back.offsets, back.ids, "", None, [0.5, 1, 0.5, 1],
        source=back.source, stored=back.stored,
    )  # fmt: skip
    joined = scaled.extended(_toy_contributions().head(1))
    assert np.allclose(joined.step_scales(), [0.5, 1, 0.5, 1, 1]) and joined.steps == 5
    assert torch.allclose(joined.total()["w"], scaled.total()["w"] + c.deltas["w"][0].float())
    save_contributions(storage, layout, "v-g2", joined)
    loaded = load_contributions(storage, layout, "v-g2")
    assert loaded.stored == 4 and loaded.steps == 5
    assert storage.local_path(loaded.source).stat().st_ino == (
        storage.local_path(back.source).stat().st_ino
    )
    assert torch.equal(loaded.deltas["w"], joined.deltas["w"])
    assert np.array_equal(loaded.ids, joined.ids)
    assert torch.allclose(loaded.total()["w"], joined.total()["w"])
    # a DPUS of the joined steps drops the touched ones (step 1 {3, 1}, step 3 {2, 3}) and
    # keeps the untouched steps' scales; the appended step (ids {2, 0}) stays
    _, rest3, _ = loaded.without([3], "share")
    assert rest3.steps == 3 and np.allclose(rest3.step_scales(), [0.5, 0.5, 1])
    save_contributions(storage, layout, "v-g3", rest3)
    again3 = load_contributions(storage, layout, "v-g3")
    assert torch.allclose(again3.total()["w"], rest3.total()["w"])
    assert again3.untracked.tolist() == [1, 2]


def test_contributions_of_the_first_format_still_load_and_torn_updates_are_missing(tmp_path):
    from safetensors.torch import save as st_save

    from ray_unlearn.platform.core.storage import RunLayout, Storage

    storage, layout = Storage(tmp_path), RunLayout("r")
    c = _toy_contributions()
    meta = {"format": "ray-unlearn-contributions/1", "stage": "0", "dtype": "float16"}
    meta |= {"digest": c.digest, "steps": str(c.steps)}
    old = st_save(
        {
            "delta.w": c.deltas["w"],
            "batch.offsets": torch.from_numpy(c.offsets),
            "batch.ids": torch.from_numpy(c.ids),
            "batch.segments": torch.from_numpy(c.segments),
        },
        metadata=meta,
    )
    storage.write_bytes(contribution_path(layout, "v1-g0"), old)
    back = load_contributions(storage, layout, "v1-g0")
    assert torch.equal(back.deltas["w"], c.deltas["w"]) and back.source is None

    save_contributions(storage, layout, "v2-g0", c)
    path = storage.local_path(load_contributions(storage, layout, "v2-g0").source)
    blob = path.read_bytes()
    path.write_bytes(blob[:-8])  # a crash cut the updates short
    with pytest.raises(MissingContributions, match="unreadable"):
        load_contributions(storage, layout, "v2-g0")
    # a garbled header (offsets that do not fit the shape) is as bad, not wrong data
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    header["delta.w"]["data_offsets"][0] += 2
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    path.write_bytes(blob[:8] + raw + blob[8 + n :])
    with pytest.raises(MissingContributions, match="not its shape"):
        load_contributions(storage, layout, "v2-g0")


def test_link_or_copy_copies_where_hard_links_fail(tmp_path, monkeypatch):
    import os

    from ray_unlearn.platform.core.storage import Storage

    storage = Storage(tmp_path)
    storage.write_bytes("a/src.bin", b"updates")
    storage.link_or_copy("a/src.bin", "b/dst.bin")
    assert os.path.samefile(storage.local_path("a/src.bin"), storage.local_path("b/dst.bin"))

    def no_links(*_):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    storage.link_or_copy("a/src.bin", "c/dst.bin")
    assert storage.read_bytes("c/dst.bin") == b"updates"
    assert not os.path.samefile(storage.local_path("a/src.bin"), storage.local_path("c/dst.bin"))
    assert [n for n in os.listdir(storage.local_path("c")) if n.startswith(".tmp-")] == []


def test_a_sample_whose_step_left_the_record_is_retrained_exactly(recorded_run):
    """After a share DPUS the co-batched samples of the dropped steps are untracked: DPUS
    refuses them before logging, HS retrains their shard exactly."""
    from ray_unlearn.platform.methods import check_request as _check_strategy
    from ray_unlearn.platform.methods.hybrid.contributions import untracked_samples

    ctx = recorded_run
    shard = 1
    eng = UnlearningEngine(ctx, LocalShards(ctx))
    eng.submit(owner_id=_owner_in(ctx, shard, 0), request_id="a")
    (ra,) = eng.execute_pending(strategy="dpus")
    assert ra.details["exact"] is False
    chain = ctx.model_store.registry().shards[shard].chain
    serving = load_contributions(ctx.storage, ctx.layout, chain[-1])
    assert len(serving.untracked)
    victim = int(serving.untracked[0])
    assert untracked_samples(ctx.storage, ctx.layout, chain[-1], [victim]).tolist() == [victim]
    with pytest.raises(ValueError, match="no recorded contributions"):
        _check_strategy(ctx, "dpus", None, [victim])
    ctx.config.hybrid.threshold = 0.0  # hs would choose DPUS: the record says it cannot
    eng.submit(sample_ids=[victim], request_id="b")
    (rb,) = eng.execute_pending(strategy="hs")
    info = rb.details["strategy_info"][str(shard)]
    assert rb.details["exact"] and info["reason"] == "no-contributions"
    assert audit(ctx)["clean"]
