"""Ray integration: the Ray Train job, the executor's shard actors, the detached executor.

All tests share one embedded Ray session (tests/conftest.py: ``ray_session``).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ray_unlearn.platform.core.audit import audit
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.core.training import train_shard
from tests.conftest import tiny_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    """A tiny run trained by the real Ray Train job (3 workers, one per shard)."""
    from ray_unlearn.train.job import run_training

    # hybrid.record: the workers also record contributions (what DPUS/HS/OHS subtract)
    ctx = create_run(tiny_config(tmp_path_factory.mktemp("ray"), "hybrid.record=true"))
    summary = run_training(ctx)
    return ctx, summary


def test_train_job_records_every_slice_version(trained):
    ctx, summary = trained
    assert summary["workers"] == 3
    reg = ctx.model_store.registry()
    assert sorted(reg.shards) == [0, 1, 2]
    for k, entry in reg.shards.items():
        assert entry.chain == [f"s{k:03d}-r{r:02d}-g0000" for r in range(3)]
        for r, vid in enumerate(entry.chain):
            m = ctx.model_store.manifest(vid)
            assert (
                m["parent"] == (entry.chain[r - 1] if r else None)
                and m["created_by"] == "train-job"
            )
            ids, slices = ctx.plan.shard_members(k)
            assert np.array_equal(ctx.model_store.sample_ids(vid), np.sort(ids[slices <= r]))
    # Train's checkpoints were transport only: gone, so no stray copy keeps deleted data.
    assert not ctx.storage.exists(ctx.layout.train_transport)


def test_train_job_weights_equal_in_process_training(trained):
    """A Ray Train worker and this process compute the same bits (same seed, same threads)."""
    ctx, _ = trained
    cfg = ctx.config
    k = 2
    stages = train_shard(
        ctx.shard_data(k),
        cfg.model,
        cfg.training,
        seed=cfg.seed,
        feature_shape=ctx.feature_shape,
        num_classes=ctx.num_classes,
    )
    for st, vid in zip(stages, ctx.model_store.registry().shards[k].chain, strict=True):
        stored = ctx.model_store.load_state(vid)
        assert all(torch.equal(stored[n], st.state[n]) for n in stored)


def test_train_job_records_contributions_dpus_can_use(trained):
    from ray_unlearn.platform.methods.hybrid.contributions import load_contributions

    ctx, _ = trained
    chain = ctx.model_store.registry().shards[1].chain
    prev = None
    for r, vid in enumerate(chain):
        w = ctx.model_store.load_state(vid)  # raises if the digest does not match
        c = load_contributions(ctx.storage, ctx.layout, vid, expect=w)
        assert c.stage == r and len(c.ids) > 0
        if prev is not None:  # the recorded updates sum to the stage's change of weights
            total = c.total()
            assert all(torch.allclose(prev[n] + total[n], w[n], atol=1e-3) for n in w)
        prev = w


def test_executor_forgets_through_shard_actors(trained):
    from ray_unlearn.train.executor import Executor

    ctx, _ = trained
    ex = Executor(ctx.storage.uri, ctx.run_id)
    acc_before = ex.test_accuracy()
    owners = np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])
    rec = ex.forget(owner_id=str(owners[0]), request_id="ray-1")
    assert rec["state"] == "done" and rec["versions_retired"] and rec["executed_by"] == "embedded"
    assert audit(ctx, owner_id=str(owners[0]))["live_versions_containing"] == {}
    assert abs(ex.test_accuracy() - acc_before) < 0.1
    timing = ex.retrain_from_scratch()
    assert timing["shards"] == 3 and timing["seconds"] > 0
    ex.backend.shutdown()


def test_detached_executor_is_named_and_reused(trained):
    import ray

    from ray_unlearn.train.executor import NAMESPACE, executor_actor_name, get_executor

    ctx, _ = trained
    a = get_executor(ctx.storage.uri, ctx.run_id, detached=True)
    owners = np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])
    try:
        rec = a.forget(owner_id=str(owners[1]))
        assert rec["state"] == "done" and rec["executed_by"] == executor_actor_name(ctx.run_id)
        b = get_executor(ctx.storage.uri, ctx.run_id, detached=True)  # same actor, not a new one
        assert b._handle._actor_id == a._handle._actor_id
        assert b.status(rec["request_id"])["state"] == "done"
    finally:
        ray.kill(ray.get_actor(executor_actor_name(ctx.run_id), namespace=NAMESPACE))


def test_forget_attached_to_the_running_executor_runs_the_request_there(trained, monkeypatch):
    """`forget --address` with the run's executor up: the request (checks, log, execution)
    runs whole in the executor, called through its control endpoint without importing Ray
    (train/control.py); bad input comes back as the platform's own error; the document is
    the one the Ray path gives."""
    import ray

    from ray_unlearn import api
    from ray_unlearn.train.control import find_executor, read_control
    from ray_unlearn.train.executor import NAMESPACE, executor_actor_name, get_executor
    from tests.conftest import assert_equals_scratch, imported_by

    ctx, _ = trained
    monkeypatch.setenv("RAY_UNLEARN_CONTROL_HOST", "127.0.0.1")  # handed to the new actor
    get_executor(ctx.storage.uri, ctx.run_id, detached=True).ping()
    owners = np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])
    logged = []
    try:
        assert read_control(ctx.storage.uri, ctx.run_id)["url"].startswith("http://127.0.0.1:")
        # a fresh client: an address that is no cluster, so a fallback to Ray would fail
        code = (
            "from ray_unlearn import api\n"
            f"doc = api.forget({ctx.run_id!r}, owner={str(owners[2])!r}, "
            f"storage={ctx.storage.uri!r}, address='127.0.0.1:1', request_id='via-http')\n"
            "assert doc['state'] == 'done', doc"
        )
        assert imported_by(code, ["ray", "torch", "pyarrow"]) == []
        assert ctx.deletion_log.get("via-http").state.value == "done"
        assert audit(ctx, owner_id=str(owners[2]))["live_versions_containing"] == {}
        # the same document as through Ray (a repeat: idempotent, nothing re-executed)
        again = {"owner_id": str(owners[2]), "request_id": "via-http"}
        handle = ray.get_actor(executor_actor_name(ctx.run_id), namespace=NAMESPACE)
        by_ray = ray.get(handle.forget_request.remote(ctx.storage.uri, **again))
        by_http = find_executor(ctx.storage.uri, ctx.run_id).forget_request(
            ctx.storage.uri, **again
        )
        timings = ("ack_seconds", "executor_seconds")
        assert {k: v for k, v in by_ray.items() if k not in timings} == {
            k: v for k, v in by_http.items() if k not in timings
        }
        assert by_http["created"] is False and by_http["state"] == "done"
        # --no-wait through the endpoint: logged by the executor, left for the next execution
        nw = api.forget(
            ctx.run_id, owner=str(owners[5]), storage=ctx.storage.uri, address="127.0.0.1:1",
            request_id="no-wait", wait=False,
        )  # fmt: skip
        assert nw["state"] == "pending" and nw["executor_seconds"] > 0
        assert ctx.deletion_log.get("no-wait").state.value == "pending"
        doc = api.forget(
            ctx.run_id,
            owner=str(owners[3]),
            storage=ctx.storage.uri,
            address="attached",  # Ray is up here: connect() attaches to the session
            on_logged=lambda rec, created: logged.append((rec.request.request_id, created)),
        )
        assert doc["state"] == "done" and doc["executed_by"] == executor_actor_name(ctx.run_id)
        assert 0 < doc["executor_seconds"] <= doc["seconds"]
        assert logged == [(doc["request_id"], True)]
        assert ctx.deletion_log.get("no-wait").state.value == "done"  # executed in that batch
        assert audit(ctx, owner_id=str(owners[3]))["live_versions_containing"] == {}
        for k in doc["shards"]:
            assert_equals_scratch(ctx, k, ctx.deletion_log.deleted_sample_ids())
        with pytest.raises(ValueError, match="owner") as e:
            api.forget(ctx.run_id, owner="no-such-owner", storage=ctx.storage.uri, address="a")
        assert "Traceback" not in str(e.value)
        with pytest.raises(ValueError, match="serves storage root"):
            api.forget(ctx.run_id, owner=str(owners[4]), storage="/elsewhere", address="a")
    finally:
        ray.kill(ray.get_actor(executor_actor_name(ctx.run_id), namespace=NAMESPACE))
    # killed: its file stays, naming a closed port; a client does not follow it
    assert read_control(ctx.storage.uri, ctx.run_id) is not None
    t0 = time.perf_counter()
    while find_executor(ctx.storage.uri, ctx.run_id) is not None:  # until the process is gone
        assert time.perf_counter() - t0 < 30, "the killed executor still answers"
        time.sleep(0.2)


def test_s3t_train_job_and_instant_forget(ray_session, tmp_path):
    """S3T as a Ray Train job of the same shape (worker k owns shard k, a checkpoint per
    stage round), then a deletion through the shard actors: deactivation, no training."""
    from ray_unlearn.platform.methods.s3t.runtime import BACKBONE, public_sample_ids
    from ray_unlearn.train.executor import Executor
    from ray_unlearn.train.job import run_training

    ctx = create_run(
        tiny_config(
            tmp_path,
            "unlearning.strategy=s3t",
            "model.hidden=[16,16,16]",
            "s3t.epochs=1",
            "s3t.pretrain_epochs=1",
            "s3t.budget=2",
            "s3t.retrain_accuracy_threshold=1.0",  # every deletion queues a restore
        )
    )
    assert run_training(ctx)["workers"] == 3
    reg = ctx.model_store.registry()
    assert reg.shared == [BACKBONE] and all(len(e.chain) == 6 for e in reg.shards.values())
    assert not ctx.storage.exists(ctx.layout.train_transport)
    pub = set(public_sample_ids(ctx).tolist())
    owner = next(
        str(o)
        for o in np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])
        if not set(ctx.plan.samples_of_owner(o).tolist()) & pub
    )
    ex = Executor(ctx.storage.uri, ctx.run_id, background_restore=True)
    rec = ex.forget(owner_id=owner)
    assert rec["state"] == "done" and rec["versions_retired"] and rec["versions_created"] == []
    assert rec["history"][-1]["details"]["train_seconds"] == 0.0
    assert audit(ctx, owner_id=owner)["live_versions_containing"] == {}
    # the restore the accuracy trigger queued runs in the background, then is published
    (k,) = rec["history"][-1]["details"]["shards"]
    deadline = time.time() + 180
    while (st := ex.restore_status())["restores_done"] < 1 and not st["errors"]:
        assert time.time() < deadline, st
        time.sleep(0.2)
    assert not st["errors"] and st["last"]["triggered_by_accuracy"] == [k]
    entry = ctx.model_store.registry().shards[k]
    assert entry.generation > 1 and entry.meta["prefix"] == 3
    assert audit(ctx)["clean"]
    ex.backend.shutdown()
