"""The unlearning engine without Ray: log -> retrain -> publish -> retire -> done, and audits."""

from __future__ import annotations

import numpy as np
import pytest

from ray_unlearn.platform.core.audit import audit
from ray_unlearn.platform.core.deletion_log import RequestState
from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
from ray_unlearn.platform.core.plan import TEST, PlanError
from ray_unlearn.platform.eval.accuracy import serving_accuracy
from ray_unlearn.platform.methods import ShardUpdate, UnlearningStrategy, available_strategies
from ray_unlearn.platform.methods.base import _REGISTRY, register_strategy
from tests.conftest import assert_equals_scratch


def _engine(ctx):
    return UnlearningEngine(ctx, LocalShards(ctx))


def _trained_owner(ctx, index=0):
    owners = np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])
    return str(owners[index])


def test_forget_owner_end_to_end(tiny_run):
    ctx = tiny_run
    owner = _trained_owner(ctx, 3)
    ids = ctx.plan.samples_of_owner(owner)
    before = audit(ctx, owner_id=owner)
    assert before["live_versions_containing"] and before["clean"]  # present, not yet deleted

    rec = _engine(ctx).forget(owner_id=owner, request_id="gdpr-1")

    assert rec.state == RequestState.DONE
    after = audit(ctx, owner_id=owner)
    assert after["live_versions_containing"] == {} and after["clean"]
    assert (
        after["requests"][0]["request_id"] == "gdpr-1" and after["requests"][0]["state"] == "done"
    )
    # Only the affected shard's stages from the first affected slice were replaced.
    (shard,) = {int(k) for k in ctx.plan.locate(ids)[0] if k != TEST}
    first = int(min(s for s in ctx.plan.locate(ids)[1] if s != TEST))
    assert rec.details["shards"] == [shard] and rec.details["first_slices"] == {str(shard): first}
    # where the request's time went: the shard's own part holds its training
    d = rec.details
    assert set(d["shard_seconds"]) == {str(shard)}
    assert 0 < d["train_seconds"] <= d["shard_seconds"][str(shard)] <= d["seconds"]
    parts = d["shard_parts_seconds"][str(shard)]
    assert set(parts) == {"reload", "rows", "save"} and min(parts.values()) >= 0
    assert d["train_seconds"] + sum(parts.values()) <= d["shard_seconds"][str(shard)]
    assert d["shards_reloaded"] == []  # nothing else published: the runtime's chain is current
    assert rec.versions_retired == [f"s{shard:03d}-r{r:02d}-g0000" for r in range(first, 3)]
    reg = ctx.model_store.registry()
    assert reg.shards[shard].chain[first:] == rec.versions_created
    assert all(e.generation == 0 for k, e in reg.shards.items() if k != shard)
    for vid in rec.versions_retired:  # evidence stays, weights are gone
        m = ctx.model_store.manifest(vid)
        assert m["state"] == "retired" and m["retired_by"] == ["gdpr-1"]
        with pytest.raises(FileNotFoundError):
            ctx.model_store.load_state(vid)
        assert ctx.storage.listdir(ctx.layout.version_dir(vid)) == [
            "manifest.json",
            "samples.parquet",
        ]
    # The published model is exactly the shard trained from scratch without the owner.
    scratch = assert_equals_scratch(ctx, shard, ids)
    m = ctx.model_store.manifest(reg.shards[shard].chain[-1])
    assert m["parent"] == (reg.shards[shard].chain[first - 1] if first else None)
    assert m["n_samples"] == len(scratch[-1].sample_ids)


def test_repeated_request_id_is_not_executed_twice(tiny_run):
    eng = _engine(tiny_run)
    owner = _trained_owner(tiny_run, 1)
    first = eng.forget(owner_id=owner, request_id="r-1")
    again = eng.forget(owner_id=owner, request_id="r-1")
    assert again.history == first.history
    assert len(tiny_run.deletion_log.records()) == 1


def test_bad_requests_change_nothing(tiny_run):
    ctx = tiny_run
    eng = _engine(ctx)
    reg = ctx.model_store.registry().to_json()
    with pytest.raises(PlanError, match="unknown owner id 'ghost'"):
        eng.forget(owner_id="ghost")
    with pytest.raises(PlanError, match="unknown sample ids: 99999999"):
        eng.forget(sample_ids=[int(ctx.plan.sample_ids[0]), 99999999])
    with pytest.raises(ValueError, match="exactly one of"):
        eng.forget(owner_id=_trained_owner(ctx), sample_ids=[1])
    with pytest.raises(ValueError, match="exactly one of"):
        eng.forget(sample_ids=[])
    assert ctx.deletion_log.records() == []
    assert ctx.model_store.registry().to_json()["shards"] == reg["shards"]


def test_held_out_samples_need_no_retraining(tiny_run):
    ctx = tiny_run
    test_id = int(ctx.plan.sample_ids[ctx.plan.shards == TEST][0])
    rec = _engine(ctx).forget(sample_ids=[test_id])
    assert (
        rec.state == RequestState.DONE
        and rec.versions_retired == []
        and rec.details["shards"] == []
    )


def test_emptied_shard_leaves_the_ensemble(tiny_run):
    ctx = tiny_run
    ids, _ = ctx.plan.shard_members(0)
    rec = _engine(ctx).forget(sample_ids=ids.tolist())
    assert rec.details["emptied_shards"] == [0]
    reg = ctx.model_store.registry()
    assert reg.shards[0].empty and reg.shards[0].chain == [] and 0 not in reg.serving_versions()
    assert 0.5 < serving_accuracy(ctx) <= 1.0  # the other shards still answer
    a = audit(ctx)
    assert (
        a["clean"] and a["live_versions_containing"] == {} and a["deleted_sample_count"] == len(ids)
    )


def test_batch_of_pending_requests_and_recovery_after_a_crash(tiny_run):
    ctx = tiny_run
    eng = _engine(ctx)
    a, b = _trained_owner(ctx, 5), _trained_owner(ctx, 6)
    eng.submit(owner_id=a, request_id="a")
    eng.submit(owner_id=b, request_id="b")
    # The process dies here; a new executor finds the acknowledged requests and runs them.
    done = _engine(ctx).execute_pending()
    assert [r.request.request_id for r in done] == ["a", "b"]
    assert all(r.state == RequestState.DONE and r.details["batch"] == ["a", "b"] for r in done)
    assert audit(ctx, owner_id=a)["live_versions_containing"] == {}
    assert audit(ctx, owner_id=b)["live_versions_containing"] == {}
    assert _engine(ctx).execute_pending() == []


def test_execute_only_the_named_requests(tiny_run):
    """One at a time (the inference-oblivion baseline): the others stay pending."""
    ctx = tiny_run
    eng = _engine(ctx)
    eng.submit(owner_id=_trained_owner(ctx, 5), request_id="a")
    eng.submit(owner_id=_trained_owner(ctx, 6), request_id="b")
    done = eng.execute_pending(request_ids=["b"])
    assert [r.request.request_id for r in done] == ["b"] and done[0].details["batch"] == ["b"]
    assert [r.request.request_id for r in ctx.deletion_log.unfinished()] == ["a"]
    assert [r.request.request_id for r in eng.execute_pending()] == ["a"]


def test_a_failing_strategy_marks_failed_and_a_retry_succeeds(tiny_run):
    class Broken(UnlearningStrategy):
        name, exact = "broken-for-test", True

        def unlearn_shard(self, state, deleted) -> ShardUpdate:
            raise RuntimeError("disk full")

    register_strategy(Broken)
    try:
        assert "broken-for-test" in available_strategies()
        eng = _engine(tiny_run)
        owner = _trained_owner(tiny_run, 2)
        eng.submit(owner_id=owner, request_id="x")
        with pytest.raises(RuntimeError, match="disk full"):
            eng.execute_pending(strategy="broken-for-test")
        rec = tiny_run.deletion_log.get("x")
        assert rec.state == RequestState.FAILED and "disk full" in rec.details["error"]
        assert audit(tiny_run, owner_id=owner)["live_versions_containing"]  # nothing retired
        (done,) = _engine(tiny_run).execute_pending()
        assert done.state == RequestState.DONE
        assert audit(tiny_run, owner_id=owner)["live_versions_containing"] == {}
    finally:
        _REGISTRY.pop("broken-for-test")


def test_audit_detects_a_violation(tiny_run):
    """If a live version still held deleted data, the audit must say so (not just trust the log)."""
    ctx = tiny_run
    owner = _trained_owner(ctx, 4)
    _engine(ctx).forget(owner_id=owner)
    reg = ctx.model_store.registry()
    shard = int(next(k for k in ctx.plan.locate(ctx.plan.samples_of_owner(owner))[0] if k != TEST))
    # Simulate a broken executor that switched the registry back to the old chain's manifests.
    stale = [f"s{shard:03d}-r{r:02d}-g0000" for r in range(3)]
    reg.shards[shard].chain = stale
    ctx.model_store.write_registry(reg)
    a = audit(ctx, owner_id=owner)
    assert not a["clean"] and set(a["violations"]) & set(stale)


def test_a_long_lived_executor_notices_deletions_made_elsewhere(tiny_run):
    """Executor A holds shard state in memory; a one-off process B forgets an owner of the
    same shard. A's next deletion must start from B's result, not bring B's owner back."""
    ctx = tiny_run
    by_shard: dict[int, list[str]] = {}
    for o in np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST]):
        k = int(ctx.plan.locate(ctx.plan.samples_of_owner(o))[0].max())
        by_shard.setdefault(k, []).append(str(o))
    shard, (x, y) = next((k, v[:2]) for k, v in by_shard.items() if len(v) >= 2)
    a = _engine(ctx)
    a.backend.shard(shard)  # loaded before B acts
    _engine(ctx).forget(owner_id=x)
    a.forget(owner_id=y)
    assert audit(ctx, owner_id=x)["live_versions_containing"] == {}
    assert audit(ctx, owner_id=y)["live_versions_containing"] == {}
    gone = np.concatenate([ctx.plan.samples_of_owner(x), ctx.plan.samples_of_owner(y)])
    assert_equals_scratch(ctx, shard, gone)
