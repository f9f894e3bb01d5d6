"""The unlearning engine: validate, log durably, execute, publish, retire, mark done.

The engine knows *what* to do; a :class:`ShardBackend` knows *where* shard work runs (in
this process for tests, in long-lived Ray actors in ``ray_unlearn.train.executor``).

Order of effects for a batch of requests, chosen so a crash at any point loses nothing:

1. requests are durable in the log before they are acknowledged (``submit``);
2. they are marked ``executing``; shards retrain and write their new versions;
3. the registry switches to the new chains (one atomic write): from here on the old
   versions serve nothing;
4. the old versions are retired (weights purged, manifests say by which request);
5. the requests are marked ``done`` with the versions they retired.

After a crash, unfinished requests are executed again by the next ``execute_pending``; training is
deterministic, so a repeated step writes the same versions.

Executions are exclusive per run across processes: each one (and each restore's publish)
holds the run's lease (platform/core/lease.py) and starts by recovering what an interrupted one
left (platform/core/publish.py: an intent record before the switch, so a kill -9 between steps 3
and 5 is finished, and one before step 3 rolled back). Request transitions happen only
under the lease; the registry is written by compare-and-swap.
"""

from __future__ import annotations

import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np

from ray_unlearn.platform.core.compaction import prepare_compaction, scrub_deleted
from ray_unlearn.platform.core.deletion_log import RequestRecord, RequestState
from ray_unlearn.platform.core.lease import Lease, LeaseError
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.publish import (
    EXECUTING,
    clear_intent,
    done_details,
    has_intent,
    pause_point,
    publish,
    recover,
    write_intent,
)
from ray_unlearn.platform.core.run import RunContext
from ray_unlearn.platform.core.runtime import ShardRuntime, make_runtime
from ray_unlearn.platform.core.versions import RegistryConflict
from ray_unlearn.platform.methods import registry
from ray_unlearn.platform.serving import fence


class ShardBackend(Protocol):
    def unlearn(
        self, per_shard: dict[int, np.ndarray], strategy: str, request_ids: list[str]
    ) -> list[dict[str, Any]]:
        """Run ``ShardRuntime.unlearn`` for each shard; results in any order."""

    def retrain_from_scratch(self) -> list[dict[str, Any]]:
        """Run ``ShardRuntime.retrain_from_scratch`` on every non-empty shard."""

    def restore(self, shards: list[int], request_ids: list[str]) -> list[dict[str, Any]]:
        """Retrain whole shards a method's restore plan names (say, too shallow);
        results like ``unlearn``."""

    def predict_proba(self, features: np.ndarray) -> dict[int, np.ndarray]:
        """shard -> (n, classes) for every non-empty shard."""


class LocalShards:
    """Shard runtimes in this process, loaded on first use and worked one after another.

    Loading is lazy so that a one-off ``forget`` pays only for the shards it touches.
    """

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.shard_ids = sorted(ctx.model_store.registry().shards)
        self._loaded: dict[int, ShardRuntime] = {}

    def shard(self, k: int) -> ShardRuntime:
        if k not in self._loaded:
            deleted = self.ctx.deletion_log.deleted_sample_ids()
            self._loaded[k] = make_runtime(self.ctx, k, deleted)
        return self._loaded[k]

    def unlearn(self, per_shard, strategy, request_ids):
        return [
            self.shard(k).unlearn(ids, strategy, request_ids)
            for k, ids in sorted(per_shard.items())
        ]

    def retrain_from_scratch(self):
        shards = [self.shard(k) for k in self.shard_ids]
        return [s.retrain_from_scratch() for s in shards if not s.empty]

    def restore(self, shards, request_ids):
        return [self.shard(k).restore(request_ids) for k in shards]

    def predict_proba(self, features):
        out = {k: self.shard(k).predict_proba(features) for k in self.shard_ids}
        return {k: p for k, p in out.items() if p is not None}


def resolve_request(ctx: RunContext, owner_id: str | None = None, sample_ids=None) -> np.ndarray:
    """The sample ids a request names; raises (PlanError) on unknown ids or owners."""
    if (owner_id is None) == (sample_ids is None or len(sample_ids) == 0):
        raise ValueError(
            "a deletion request names exactly one of: an owner id, or a non-empty list of sample ids"
        )
    if owner_id is not None:
        ids = np.sort(ctx.plan.samples_of_owner(owner_id))
    else:
        ids = np.unique(np.asarray(list(sample_ids), dtype=np.int64))
        ctx.plan.positions(ids)  # raises on unknown ids, before anything is written
    # a method may declare samples not subject to deletion (a public split): a
    # request for them is refused before it is logged
    return registry.refuse_undeletable(ctx, ids)


def submit_request(
    ctx: RunContext, *, owner_id=None, sample_ids=None, request_id=None, deadline=None
) -> tuple[RequestRecord, bool]:
    """Validate a request, log it durably, fence the run's gateways for it, record the
    acknowledgement (no execution). Returns (record, newly created).

    Every entry point (HTTP, CLI, jobs, the Python API) comes through here, so the promise
    holds whatever the entry: when this returns, every live gateway replica of the run holds
    the request in its view, or its lease on an older view has run out
    (:mod:`ray_unlearn.platform.serving.fence`). That wait is bounded by the gateways' lease (2 s by
    default) and never skips one; without a gateway it costs one folder listing.
    """
    ids = resolve_request(ctx, owner_id, sample_ids)
    record, created = ctx.deletion_log.submit(
        ids.tolist(), owner_id=owner_id, request_id=request_id, deadline=deadline
    )
    if record.state != RequestState.DONE:
        rid = record.request.request_id
        if fence.read_ack(ctx.storage, ctx.layout, rid) is None:
            written_at = time.time()  # the request file is durable: t_w of the fence
            fenced = fence.await_fence(ctx.storage, ctx.layout, written_at)
            fence.record_ack(ctx.storage, ctx.layout, rid, written_at, fenced)
    return record, created


class UnlearningEngine:
    def __init__(self, ctx: RunContext, backend: ShardBackend, executor_name: str = "local"):
        self.ctx, self.backend, self.executor_name = ctx, backend, executor_name
        self.last_restore: dict[str, Any] | None = None
        # (plan, request_ids) -> None: schedules a restore instead of running it inline
        self.restore_hook: Callable[[dict[str, Any], list[str]], None] | None = None
        # (holder's lease record) -> None: told once when an execution waits for another's
        self.on_lease_wait: Callable[[dict[str, Any]], None] | None = None
        self.lease_ttl_s: float | None = None  # None: platform/core/lease.py's default
        self.last_recovery: dict[str, Any] | None = None
        self._lease: Lease | None = None  # held during an execution of this engine

    # -- requests --------------------------------------------------------------------
    def submit(
        self, *, owner_id=None, sample_ids=None, request_id=None, deadline=None
    ) -> tuple[RequestRecord, bool]:
        return submit_request(
            self.ctx,
            owner_id=owner_id,
            sample_ids=sample_ids,
            request_id=request_id,
            deadline=deadline,
        )

    # -- execution -------------------------------------------------------------------
    @contextmanager
    def _exclusive(self, keep=()) -> Iterator[Lease]:
        """Hold the run's lease, recover an interrupted execution, mark this one in flight;
        re-entrant (an inline restore publishes inside an execution)."""
        if self._lease is not None:
            yield self._lease
            return
        kwargs = {"ttl_s": self.lease_ttl_s} if self.lease_ttl_s else {}
        lease = Lease(
            self.ctx.storage,
            self.ctx.layout.lease,
            holder=f"{self.executor_name}@{socket.gethostname()}:{os.getpid()}",
            **kwargs,
        )
        lease.acquire(on_wait=self.on_lease_wait)
        self._lease = lease
        try:
            pause_point("lease-acquired")
            self.last_recovery = recover(self.ctx, executor=self.executor_name, keep=keep)
            write_intent(self.ctx, {"phase": EXECUTING, "lease_generation": lease.generation})
            yield lease
            pause_point("done")
            clear_intent(self.ctx)  # kept after an error: the next execution recovers it
        finally:
            self._lease = None
            lease.release()

    def execute_pending(
        self, strategy: str | None = None, request_ids: list[str] | None = None
    ) -> list[RequestRecord]:
        """Execute every unfinished request (or those of ``request_ids`` still unfinished) as
        one batch, holding the run's lease (another process's execution is waited for);
        returns their final records."""
        if self._lease is None and not has_intent(self.ctx):
            wanted = self.ctx.deletion_log.unfinished()
            if request_ids is not None:
                wanted = [r for r in wanted if r.request.request_id in set(request_ids)]
            if not wanted:  # nothing to do and nothing to recover: no lease needed
                return []
        with self._exclusive():
            return self._execute_pending(strategy, request_ids)

    def _execute_pending(
        self, strategy: str | None, request_ids: list[str] | None
    ) -> list[RequestRecord]:
        log = self.ctx.deletion_log
        todo = log.unfinished()
        if request_ids is not None:
            wanted = set(request_ids)
            todo = [r for r in todo if r.request.request_id in wanted]
        if not todo:
            return []
        strategy = strategy or self.ctx.config.unlearning.strategy
        t0 = time.perf_counter()
        ids = [r.request.request_id for r in todo]
        for r in todo:
            if r.state != RequestState.EXECUTING:
                log.transition(
                    r.request.request_id,
                    RequestState.EXECUTING,
                    executed_by=self.executor_name,
                    strategy=strategy,
                )
        prepared = None
        try:
            already = log.deleted_sample_ids()
            gone = set(already).union(*(r.request.sample_ids for r in todo))
            # the data copy's compaction (read, filter, encode: seconds at 100k rows) runs
            # while the shards retrain; only its write waits for the switch (scrub below)
            prepared = prepare_compaction(self.ctx, gone)
            wanted = np.unique(
                np.concatenate([np.asarray(r.request.sample_ids, dtype=np.int64) for r in todo])
            )
            wanted = wanted[
                ~np.isin(wanted, np.fromiter(already, dtype=np.int64, count=len(already)))
            ]
            per_shard = self._group_by_shard(wanted)
            results = (
                {res["shard"]: res for res in self.backend.unlearn(per_shard, strategy, ids)}
                if per_shard
                else {}
            )
            # each request's done record, computed before the switch: the intent carries
            # them so that recovery after a crash past the switch can finish the requests
            details = {
                r.request.request_id: done_details(
                    self.ctx,
                    r.request.sample_ids,
                    results,
                    executor=self.executor_name,
                    strategy=strategy,
                    batch=ids,
                    seconds=time.perf_counter() - t0,
                )
                for r in todo
            }
            self._publish(results, ids, details)
            # "done" means scrubbed: reports, the run's data copy, Train's transport
            scrub_deleted(self.ctx, gone, prepared)
        except Exception as e:
            # a lost lease (or another writer's registry) means another executor owns these
            # requests now: their transitions are its to make
            if not isinstance(e, (LeaseError, RegistryConflict)):
                for rid in ids:
                    log.transition(rid, RequestState.FAILED, error=f"{type(e).__name__}: {e}")
            raise
        finally:
            if prepared is not None:
                prepared.close()  # never leave it running into interpreter exit (Arrow threads)
        done = [
            log.transition(r.request.request_id, RequestState.DONE, **details[r.request.request_id])
            for r in todo
        ]
        # a method may retrain shards after the requests are already honoured (when a
        # deletion only deactivated stages, done above in microseconds, and left a shard too
        # shallow): by ``restore_hook`` when one is set (the executor actor: in
        # the background), else now.
        plan = registry.restore_plan(self.ctx, results, self.backend.predict_proba)
        if plan is not None:
            if plan["shards"]:
                if self.restore_hook is not None:
                    self.restore_hook(plan, ids)
                else:
                    self.restore(plan, ids)
        return done

    def restore(self, plan: dict[str, Any], request_ids: list[str]) -> dict[str, Any]:
        """Retrain ``plan["shards"]`` (a method's restore plan) and publish the new versions."""
        t0 = time.perf_counter()
        restored = self.backend.restore(plan["shards"], request_ids)
        return self.publish_restored(plan, restored, request_ids, time.perf_counter() - t0)

    def publish_restored(
        self, plan: dict[str, Any], restored: list[dict[str, Any]], request_ids, seconds: float
    ) -> dict[str, Any]:
        # trained outside the lease (in the background): its new versions are not orphans
        with self._exclusive(keep=[v for r in restored for v in r.get("created", [])]):
            self._publish({r["shard"]: r for r in restored}, request_ids)
        self.last_restore = {
            "shards": plan["shards"],
            "depth": plan["depth"],
            "triggered_by_accuracy": plan["triggered_by_accuracy"],
            "accuracy_before": plan["accuracy"],
            "seconds": seconds,
            "train_seconds": sum(r["train_seconds"] for r in restored),
            "late_deletions": sorted(d for r in restored for d in r.get("late_deletions", [])),
            "requests": list(request_ids),
            "finished_at": time.time(),
        }
        return self.last_restore

    def forget(
        self, *, owner_id=None, sample_ids=None, request_id=None, deadline=None
    ) -> RequestRecord:
        """Submit (durably) and execute one request; idempotent by request id."""
        record, _ = self.submit(
            owner_id=owner_id, sample_ids=sample_ids, request_id=request_id, deadline=deadline
        )
        if record.state != RequestState.DONE:
            self.execute_pending()
        return self.ctx.deletion_log.get(record.request.request_id)

    def _group_by_shard(self, sample_ids: np.ndarray) -> dict[int, np.ndarray]:
        if not len(sample_ids):
            return {}
        shards, _ = self.ctx.plan.locate(sample_ids)
        groups: dict[int, list[int]] = defaultdict(list)
        for sid, k in zip(sample_ids.tolist(), shards.tolist(), strict=True):
            if k != TEST:
                groups[k].append(sid)
        return {k: np.asarray(v, dtype=np.int64) for k, v in groups.items()}

    def _publish(
        self,
        results: dict[int, dict[str, Any]],
        request_ids: list[str],
        details: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Intent, registry switch (compare-and-swap), retire: see platform/core/publish.py."""
        with self._exclusive() as lease:
            publish(self.ctx, results, request_ids, lease=lease, details=details)
