"""The gateway's predict loop without Ray: the gateway class itself on a tiny run, its shard
deployments replaced by in-process fakes that compute with the real models."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch

from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.runtime import load_serving_model
from ray_unlearn.platform.core.training import predict_proba
from ray_unlearn.platform.serving import fence
from ray_unlearn.serve.gateway import Gateway, PredictRequest


class _Call:
    def __init__(self, fn):
        self.remote = fn


class _FakeShard:
    """A shard deployment's handle: ``predict.remote((version, x))`` -> awaitable (n, C).
    ``block_s``: its first call blocks the event loop that long, as a replica starved of CPU
    does (no fence read can run meanwhile)."""

    def __init__(self, ctx, block_s: float = 0.0, during=None):
        self.ctx, self.block_s, self.during, self.rows = ctx, block_s, during, []
        self.predict = _Call(self._predict)

    async def _predict(self, call):
        version, x = call
        self.rows.append(len(x))
        if self.block_s:
            time.sleep(self.block_s)
            self.block_s = 0.0
        if self.during is not None:  # something that happens while this shard computes
            self.during, during = None, self.during
            during()
        await asyncio.sleep(0)
        # the real computation: predict_proba of no rows is a (0,) tensor, as in ShardModel
        return predict_proba(load_serving_model(self.ctx, version), torch.from_numpy(x)).numpy()


class _FakeExecutor:
    class ping:  # noqa: N801 - mimics an actor method
        @staticmethod
        def remote():
            return None


async def _gateway(ctx, monkeypatch, shards, **settings):
    # the class as written (Serve wraps it in an ASGI ingress class for a replica)
    cls = next(c for c in Gateway.func_or_class.__mro__ if "_fence_loop" in vars(c))
    monkeypatch.setattr(cls, "_executor_handle", lambda self: _FakeExecutor())
    gw = cls.__new__(cls)
    args = {"storage": ctx.storage.uri, "run_id": ctx.run_id, "policy": "lazy-exclude"}
    await gw.__init__(args | settings, *shards)
    return gw


def test_a_lease_that_runs_out_during_the_shard_calls_commits_after_a_fresh_read(
    tiny_run, monkeypatch
):
    """The view expires while the shards answer (the loop was blocked past the lease) but
    does not change: the answer is committed after a new read, without asking the shards
    for zero instances (which used to end in a 500 under load)."""
    ctx = tiny_run
    n_shards = len(ctx.model_store.registry().shards)
    lease = 0.3
    shards = [_FakeShard(ctx, block_s=lease + 0.2 if k == 0 else 0.0) for k in range(n_shards)]
    x = ctx.split_records("test").features[:2]
    body = PredictRequest(instances=np.asarray(x, dtype=np.float32).reshape(2, -1).tolist())

    async def scenario():
        gw = await _gateway(ctx, monkeypatch, shards, lease_s=lease, fence_interval_s=0.1)
        try:
            reads = gw._timing["refreshes"]
            out = await gw.predict(body, None)
            return out, gw._timing["refreshes"] - reads, gw.view.view_at
        finally:
            gw.__del__()

    out, reads, view_at = asyncio.run(scenario())
    assert [p.answered for p in out.predictions] == ["certified", "certified"]
    assert all(r > 0 for s in shards for r in s.rows), [s.rows for s in shards]
    assert reads >= 1 and out.committed_at < view_at + lease
    # deregistered on shutdown
    assert fence.list_registrations(ctx.storage, ctx.layout) == []


def test_no_shard_is_asked_for_zero_instances_while_a_deletion_is_pending(tiny_run, monkeypatch):
    """Sanity of the fake: with a deletion pending on one shard, lazy-exclude answers from
    the others and the affected shard is not queried at all."""
    ctx = tiny_run
    n_shards = len(ctx.model_store.registry().shards)
    shards = [_FakeShard(ctx) for _ in range(n_shards)]
    x = np.asarray(ctx.split_records("test").features[:1], dtype=np.float32).reshape(1, -1)
    sid = int(ctx.plan.sample_ids[ctx.plan.shards != TEST][0])
    shard = int(ctx.plan.shards[ctx.plan.sample_ids == sid][0])

    async def scenario():
        gw = await _gateway(ctx, monkeypatch, shards)
        try:
            from ray_unlearn.platform.core.engine import submit_request

            await asyncio.to_thread(
                submit_request, ctx, sample_ids=np.array([sid]), request_id="p1"
            )
            await gw._refresh()
            return await gw.predict(PredictRequest(instances=x.tolist()), None)
        finally:
            gw.__del__()

    out = asyncio.run(scenario())
    (pred,) = out.predictions
    assert pred.excluded == [shard] and str(shard) not in pred.versions
    assert shards[shard].rows == [] and all(s.rows for k, s in enumerate(shards) if k != shard)


def test_a_new_pending_deletion_during_the_shard_calls_recomputes_without_asking_again(
    tiny_run, monkeypatch
):
    """A deletion on one shard is logged and gated while the shards answer: the answer is
    computed again for the new view, from the outputs it already has (no shard is asked
    twice), leaves that shard out, and equals what a fresh request answers."""
    ctx = tiny_run
    n_shards = len(ctx.model_store.registry().shards)
    x = np.asarray(ctx.split_records("test").features[:3], dtype=np.float32).reshape(3, -1)
    sid = int(ctx.plan.sample_ids[ctx.plan.shards != TEST][0])
    shard = int(ctx.plan.shards[ctx.plan.sample_ids == sid][0])
    box = {}

    def delete():  # as /v1/forget on this replica: logged, then gated at once
        record, _ = ctx.deletion_log.submit([sid], request_id="mid")
        box["gw"].view.add(record)

    shards = [_FakeShard(ctx, during=delete if k == 0 else None) for k in range(n_shards)]

    async def scenario():
        gw = box["gw"] = await _gateway(ctx, monkeypatch, shards)
        try:
            first = await gw.predict(PredictRequest(instances=x.tolist()), None)
            timing = dict(gw._timing)
            calls = [list(s.rows) for s in shards]
            again = await gw.predict(PredictRequest(instances=x.tolist()), None)
            return first, again, timing, calls
        finally:
            gw.__del__()

    first, again, timing, calls = asyncio.run(scenario())
    assert calls == [[3]] * n_shards  # every shard asked once, the recompute asked none
    assert timing["recomputes"] >= 1 and timing["shard_calls"] == n_shards
    for a, b in zip(first.predictions, again.predictions, strict=True):
        assert a.excluded == [shard] and str(shard) not in a.versions
        assert a.model_dump() == b.model_dump()
