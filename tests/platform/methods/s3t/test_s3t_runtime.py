"""S3T runs through the platform: stored versions, instant deletions by deactivation,
audits, serving models rebuilt from a version id, depth restoration, public split."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ray_unlearn.platform.core.audit import audit
from ray_unlearn.platform.core.deletion_log import RequestState
from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.run import create_run, open_run
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.core.training import predict_proba
from ray_unlearn.platform.eval.accuracy import serving_accuracy
from ray_unlearn.platform.methods.s3t.runtime import BACKBONE, load_serving_model, public_sample_ids
from tests.conftest import tiny_config

S3T = [
    "unlearning.strategy=s3t",
    "model.hidden=[16,16,16]",
    "s3t.epochs=2",
    "s3t.pretrain_epochs=2",
    "s3t.budget=2",
]


@pytest.fixture(scope="module")
def _trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3t")
    ctx = create_run(tiny_config(root, *S3T, "s3t.retrain_depth_threshold=2"))
    train_all_shards(ctx)  # once: S3T training (peft) is the slow part
    return root / "store", ctx.run_id


@pytest.fixture
def s3t_run(_trained, tmp_path):
    """A private copy of the trained run for each test."""
    src, run_id = _trained
    shutil.copytree(src, tmp_path / "store")
    return open_run(str(tmp_path / "store"), run_id)


def _private_owners(ctx):
    pub = set(public_sample_ids(ctx).tolist())
    owners = np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])
    return [str(o) for o in owners if not set(ctx.plan.samples_of_owner(o).tolist()) & pub]


def test_stored_layout_and_serving_model(s3t_run):
    ctx = s3t_run
    reg = ctx.model_store.registry()
    assert reg.shared == [BACKBONE] and sorted(reg.shards) == [0, 1, 2]
    entry = reg.shards[0]
    assert len(entry.chain) == 2 * 3 and entry.serving == "s000-o00-t03-g0000"
    assert ctx.model_store.manifest(entry.serving)["parent"] == "s000-o00-t02-g0000"
    # The model rebuilt from the version id is the one the shard runtime serves.
    rt = LocalShards(ctx).shard(0)
    x = ctx.split_records("test").features[:30]
    served = predict_proba(load_serving_model(ctx, entry.serving), torch.from_numpy(x)).numpy()
    assert np.array_equal(served, rt.predict_proba(x))
    assert 0.1 < serving_accuracy(ctx) <= 1.0


def test_deletion_deactivates_without_training_and_audits_clean(s3t_run):
    ctx = s3t_run
    owner = _private_owners(ctx)[0]
    before = ctx.model_store.registry()
    rec = UnlearningEngine(ctx, LocalShards(ctx)).forget(owner_id=owner)
    assert rec.state == RequestState.DONE and rec.details["train_seconds"] == 0.0
    assert rec.versions_created == [] and rec.versions_retired
    after = ctx.model_store.registry()
    (shard,) = rec.details["shards"]
    assert set(after.shards[shard].chain) == set(before.shards[shard].chain) - set(
        rec.versions_retired
    )
    a = audit(ctx, owner_id=owner)
    assert a["clean"] and a["live_versions_containing"] == {}
    # The new serving stage was never trained on the owner's samples.
    ids = ctx.plan.samples_of_owner(owner)
    serving = after.shards[shard].serving
    if serving is not None:
        assert not np.isin(ids, ctx.model_store.sample_ids(serving)).any()
    for vid in rec.versions_retired:
        assert ctx.model_store.manifest(vid)["state"] == "retired"


def test_shallow_shard_is_retrained_after_the_deletion_is_done(s3t_run):
    ctx = s3t_run
    eng = UnlearningEngine(ctx, LocalShards(ctx))
    for owner in _private_owners(ctx)[:12]:
        eng.forget(owner_id=owner)
        if eng.last_restore:
            break
    assert eng.last_restore is not None, (
        "12 deletions on 3 shards x 3 slices should leave a shard shallow"
    )
    (k,) = eng.last_restore["shards"]
    entry = ctx.model_store.registry().shards[k]
    assert entry.meta["dead_slices"] == [] and entry.meta["prefix"] == 3
    assert all(v.endswith(f"g{entry.generation:04d}") for v in entry.chain)
    assert audit(ctx)["clean"]


def test_public_samples_are_refused_before_logging(s3t_run):
    ctx = s3t_run
    public_id = int(public_sample_ids(ctx)[0])
    with pytest.raises(ValueError, match="public split"):
        UnlearningEngine(ctx, LocalShards(ctx)).forget(sample_ids=[public_id])
    assert ctx.deletion_log.records() == []


def test_deletion_during_a_restore_is_honoured_in_the_new_generation(s3t_run, monkeypatch):
    """A restore trains without holding the shard; a deletion arriving meanwhile is done at
    once by deactivation, and adopting the new generation deactivates it there too."""
    from ray_unlearn.platform.methods.s3t import runtime as s3t_runtime
    from ray_unlearn.platform.methods.s3t.training import S3TShard

    ctx = s3t_run
    eng = UnlearningEngine(ctx, LocalShards(ctx))
    owners = _private_owners(ctx)
    first = eng.forget(owner_id=owners[0])
    (k,) = first.details["shards"]
    rt = eng.backend.shard(k)
    late_owner = next(
        o for o in owners[1:] if set(ctx.plan.locate(ctx.plan.samples_of_owner(o))[0]) == {k}
    )
    late_ids = ctx.plan.samples_of_owner(late_owner)
    real_train = S3TShard.train
    eng.restore_hook = lambda plan, ids: None  # this test drives the one restore itself

    def train_then_delete(*a, **kw):
        trained = real_train(*a, **kw)
        # the request arrives while the new generation is training: logged, then executed
        assert eng.forget(owner_id=late_owner).state == RequestState.DONE
        return trained

    monkeypatch.setattr(s3t_runtime.S3TShard, "train", staticmethod(train_then_delete))
    res = rt.restore([first.request_id])
    monkeypatch.undo()
    assert res["late_deletions"] == sorted(late_ids.tolist())
    eng.publish_restored(
        {"shards": [k], "depth": [k], "triggered_by_accuracy": [], "accuracy": None},
        [res],
        [first.request_id],
        res["seconds"],
    )
    entry = ctx.model_store.registry().shards[k]
    assert entry.generation == res["generation"]
    for vid in entry.chain:  # no live version holds either deleted owner's samples
        held = ctx.model_store.sample_ids(vid)
        assert not np.isin(late_ids, held).any()
        assert not np.isin(ctx.plan.samples_of_owner(owners[0]), held).any()
    assert audit(ctx)["clean"]


def test_an_older_result_never_overwrites_a_newer_published_state(s3t_run):
    ctx = s3t_run
    eng = UnlearningEngine(ctx, LocalShards(ctx))
    reg = ctx.model_store.registry()
    k = sorted(reg.shards)[0]
    cur = reg.shards[k]
    stale = {
        "changed": True,
        "generation": cur.generation - 1,
        "chain": ["made-up-version"],
        "empty": False,
        "serving": "made-up-version",
        "meta": {},
        "retired": [],
    }
    eng._publish({k: stale}, ["r"])
    assert ctx.model_store.registry().shards[k].chain == cur.chain


def test_validation_accuracy_below_threshold_restores_truncated_shards(tmp_path):
    ctx = create_run(
        tiny_config(tmp_path, *S3T, "s3t.retrain_accuracy_threshold=1.0", "s3t.pretrain_epochs=1")
    )
    train_all_shards(ctx)
    eng = UnlearningEngine(ctx, LocalShards(ctx))
    rec = eng.forget(owner_id=_private_owners(ctx)[0])
    (k,) = rec.details["shards"]
    r = eng.last_restore
    assert r is not None and 0.0 <= r["accuracy_before"] < 1.0
    assert r["depth"] == [] and r["triggered_by_accuracy"] == [k]
    entry = ctx.model_store.registry().shards[k]
    assert entry.meta["prefix"] == 3 and entry.meta["dead_slices"] == []
    assert audit(ctx)["clean"]
