"""A sweep trial's data split and its exposure check, in process: no Ray."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ray_unlearn.platform.core.config import load_config
from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.methods.s3t.runtime import validation_records
from ray_unlearn.tune.exposure import ExposureCheck
from ray_unlearn.tune.spec import load_sweep
from ray_unlearn.tune.trial import held_out_split, run_trial

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
TINY = ["training.epochs=1", "model.hidden=[8]", "partition.shards=2", "partition.slices=2"]


@pytest.fixture
def trained(tmp_path):
    cfg = load_config(os.path.join(CONFIGS, "digits.yaml"), [*TINY, f"storage={tmp_path}"])
    ctx = create_run(cfg)
    train_all_shards(ctx)
    return ctx


def test_validation_rows_are_neither_training_nor_test_rows(tmp_path):
    cfg = load_config(os.path.join(CONFIGS, "digits.yaml"), [*TINY, f"storage={tmp_path}"])
    ctx = create_run(cfg)
    val, test = held_out_split(ctx, 0.5)
    train = ctx.plan.sample_ids[ctx.plan.shards != TEST]
    held = ctx.plan.sample_ids[ctx.plan.shards == TEST]
    assert len(val) and len(test) and not np.intersect1d(val, test).size
    assert not np.intersect1d(val, train).size and not np.intersect1d(test, train).size
    assert np.array_equal(np.sort(np.concatenate([val, test])), np.sort(held))
    assert 0.35 < len(val) / len(held) < 0.65  # about the fraction asked
    # by sample id alone: the same rows again, and nested as the fraction grows
    assert np.array_equal(held_out_split(ctx, 0.5)[0], val)
    assert np.isin(held_out_split(ctx, 0.3)[0], val).all()
    # S3T's accuracy trigger (same hash, same seed, s3t.validation_fraction 0.5) reads
    # validation rows only: none of its rows is a test row
    assert np.array_equal(np.sort(validation_records(ctx).sample_ids), np.sort(val))
    with pytest.raises(ValueError, match="validation_fraction=1e-09 leaves 0 validation"):
        held_out_split(ctx, 1e-9)


def test_exposure_check_reads_manifests_and_the_log(trained):
    ctx = trained
    check = ExposureCheck(ctx)
    assert check.holding_submitted([0, 1]) == {}  # nothing submitted
    engine = UnlearningEngine(ctx, LocalShards(ctx), executor_name="test")
    owner = next(
        o
        for o in np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])
        if len(set(ctx.plan.locate(ctx.plan.samples_of_owner(o))[0]) - {TEST}) == 1
    )
    ids = ctx.plan.samples_of_owner(owner)
    (shard,) = {int(k) for k in ctx.plan.locate(ids)[0] if k != TEST}
    engine.submit(owner_id=str(owner))  # pending: the live versions still hold the rows
    held = check.holding_submitted([shard])
    assert held and all(set(v) <= {int(i) for i in ids} for v in held.values())
    # independently of the check: the serving version's stored sample list has the rows
    serving = ctx.model_store.registry().serving_versions()[shard]
    assert serving in held and np.isin(ids, ctx.model_store.sample_ids(serving)).any()
    assert check.holding_submitted([1 - shard]) == {}  # the other shard never held them
    engine.execute_pending()
    assert check.holding_submitted([0, 1]) == {}  # the new chain was trained without them


@pytest.mark.parametrize(
    ("policy", "exposes"),
    [("naive-postponed", True), ("lazy-exclude", False), ("immediate-wait", False)],
)
def test_naive_baseline_violates_and_safe_policies_do_not(tmp_path, policy, exposes):
    spec = load_sweep(
        os.path.join(CONFIGS, "sweep.yaml"),
        ["training.epochs=1", "model.hidden=[8]", "stream.deletions=2", "stream.predictions=15"],
    )
    params = {"partition.shards": 2, "partition.slices": 2, "serving.policy": policy}
    m = run_trial(spec, params, tmp_path)
    if exposes:
        # naive-postponed answers every instance from every shard, stale ones included,
        # and executes only after the last step's answers: each of the 2 x 15 is a violation
        assert m["violations"] == 30 and m["violation_fraction"] == 1.0
    else:
        assert m["violations"] == 0 and m["violation_fraction"] == 0.0
    assert 0 <= m["val_accuracy"] <= 1 and 0 <= m["test_accuracy"] <= 1
