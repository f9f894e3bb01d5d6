"""The unlearning executor on Ray: long-lived shard actors and the engine that drives them.

* One :class:`ShardActor` per shard keeps the shard's rows and slice snapshots in memory,
  so a deletion costs its retraining and nothing else.
* :class:`Executor` wraps the platform's :class:`UnlearningEngine` around those actors.
  Against a running cluster (``RAY_ADDRESS`` or ``--address``) it lives in a named,
  detached actor, ``ray-unlearn-executor:<run id>`` in namespace ``ray_unlearn``, which
  successive ``forget`` calls and the serving gateway reuse. With an embedded Ray, the
  calling process hosts it and it ends with the process.
* S3T depth restoration: the detached executor retrains too-shallow shards in a background
  thread after the deletions that caused it are answered (``s3t.background_restore``);
  shard actors take two calls at once, so deactivations (and predictions) go on while a
  shard retrains. The embedded executor restores inline: its process may end at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import numpy as np
import ray

from ray_unlearn.train.session import (
    NAMESPACE,
    check_cluster_gpus,
    declare_worker_gpus,
    executor_actor_name,
)

# torch's OpenMP threads sleep when idle instead of spinning (see actor_options): one rule
# for shard actors, Ray Train workers, tasks and Serve replicas
from ray_unlearn.train.worker_env import torch_runtime_env

# The platform (torch and all) is imported inside the methods, not here: a client that
# attaches to the running executor (`ray-unlearn forget --address`) gets its handle from
# ray.get_actor, which loads this module to rebuild the actor class; at the top it would cost
# that client ~2.4 s of imports (measured) for nothing it runs.

log = logging.getLogger(__name__)


def actor_options(cpus: float, gpus: float, threads: int = 0) -> dict[str, Any]:
    """A shard actor's reservation: a sliver of CPU, and resources.gpus_per_worker GPUs (the
    executor actor itself trains nothing and reserves none); and OMP_NUM_THREADS = the run's
    torch threads. Ray sets OMP_NUM_THREADS=1 when it creates an actor reserving under one
    CPU, before the actor's ``__init__`` imports torch; torch still trains with ``threads``
    threads (set_num_threads), but with that variable set at its import the same steps took
    1.6-4.9x the wall time and 1.5-4.1x the CPU on 2 shared cores (400 Adam steps of the
    purchase MLP, OMP_NUM_THREADS=1 vs unset, both at 2 threads, twice each). (The
    unlearning-speed benchmark imports torch in a worker setup hook, before Ray sets the
    variable: it never saw this.) The results do not change: the kernels' thread count is
    ``threads`` either way (tests/train/test_ray_integration.py compares them bit for bit).

    And OMP_WAIT_POLICY=PASSIVE (unless this process's environment sets a policy): torch's
    OpenMP (libgomp) otherwise spins a waiting thread for a while at every parallel region's
    end. When another process holds one of the cores (another shard, the executor's data
    compaction, any other job), the spinning thread burns the core its partner needs: the
    same 2-thread stages of a 10k-row purchase shard took 8.5-17 s instead of 1.2-2.2 s
    with one busy process beside them, and 0.75-13 s instead of 0.73-1.9 s under other
    sessions' load (3 runs each on 2 shared cores, 2026-12-04; docs/methods/sisa.md). The policy
    changes when threads sleep, not how work is split: the weights are bit for bit the same
    (tests/train/test_executor_env.py)."""
    opts: dict[str, Any] = {"num_cpus": cpus}
    if gpus > 0:
        opts["num_gpus"] = gpus
    opts["runtime_env"] = torch_runtime_env(threads)
    return opts


def warm_optimizer_imports() -> None:
    """Pay torch's one-off lazy imports of its optimizers (``torch._dynamo``: 1-3 s on 2
    cores, measured 3.1 s under load) when a shard actor starts, not inside the first
    deletion it retrains."""
    import torch

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


@ray.remote(max_concurrency=2)
class ShardActor:
    """One shard's runtime. Two calls may run at once so that an S3T ``restore`` (which
    trains without holding the shard; the runtime guards its own state) never delays a
    deactivation; every other call holds the actor's lock, one at a time as before."""

    def __init__(self, storage_uri: str, run_id: str, shard: int):
        from ray_unlearn.platform.core.run import open_run
        from ray_unlearn.platform.core.runtime import make_runtime

        declare_worker_gpus()  # training.device auto: CUDA only on a granted GPU
        ctx = open_run(storage_uri, run_id)
        self._lock = threading.Lock()
        self.rt = make_runtime(ctx, shard, ctx.deletion_log.deleted_sample_ids())
        warm_optimizer_imports()

    def info(self) -> dict[str, Any]:
        with self._lock:
            return self.rt.info()

    def unlearn(self, deleted, strategy: str, request_ids: list[str]) -> dict[str, Any]:
        with self._lock:
            return self.rt.unlearn(deleted, strategy, request_ids)

    def restore(self, request_ids: list[str]) -> dict[str, Any]:
        return self.rt.restore(request_ids)  # S3T only: locks the shard's state itself

    def retrain_from_scratch(self) -> dict[str, Any] | None:
        with self._lock:
            return None if self.rt.empty else self.rt.retrain_from_scratch()

    def predict_proba(self, features: np.ndarray) -> np.ndarray | None:
        with self._lock:
            return self.rt.predict_proba(features)


class RayShards:
    """A :class:`ShardBackend` of shard actors, at most ``max_concurrent`` training at once."""

    def __init__(
        self,
        storage_uri: str,
        run_id: str,
        shards: list[int],
        *,
        max_concurrent: int,
        cpus_per_actor: float,
        gpus_per_actor: float = 0.0,
        torch_threads: int = 0,
    ):
        self.max_concurrent = max(1, max_concurrent)
        check_cluster_gpus(gpus_per_actor, len(shards), "resources.gpus_per_worker")
        opts = actor_options(cpus_per_actor, gpus_per_actor, torch_threads)
        self.actors = {k: ShardActor.options(**opts).remote(storage_uri, run_id, k) for k in shards}
        ray.get([a.info.remote() for a in self.actors.values()])  # surface load errors here

    def _bounded(self, calls: list) -> list:
        """Run thunks returning ObjectRefs, keeping at most ``max_concurrent`` in flight."""
        pending, results, queue = [], [], list(calls)
        while queue or pending:
            while queue and len(pending) < self.max_concurrent:
                pending.append(queue.pop(0)())
            ready, pending = ray.wait(pending, num_returns=1)
            results += ray.get(ready)
        return results

    def unlearn(self, per_shard, strategy, request_ids):
        return self._bounded(
            [
                lambda k=k, ids=ids: self.actors[k].unlearn.remote(ids, strategy, request_ids)
                for k, ids in per_shard.items()
            ]
        )

    def restore(self, shards, request_ids):
        return self._bounded(
            [lambda k=k: self.actors[k].restore.remote(request_ids) for k in shards]
        )

    def retrain_from_scratch(self):
        res = self._bounded(
            [lambda a=a: a.retrain_from_scratch.remote() for a in self.actors.values()]
        )
        return [r for r in res if r is not None]

    def predict_proba(self, features):
        ref = ray.put(np.asarray(features, dtype=np.float32))
        outs = ray.get([a.predict_proba.remote(ref) for a in self.actors.values()])
        return {k: p for k, p in zip(self.actors, outs, strict=True) if p is not None}

    def shutdown(self) -> None:
        for a in self.actors.values():
            ray.kill(a)


class Executor:
    """Engine + shard actors of one run. Methods return plain JSON-able data."""

    def __init__(
        self,
        storage_uri: str,
        run_id: str,
        name: str = "embedded",
        background_restore: bool = False,
        control: bool = False,
    ):
        """``control``: also serve the HTTP control endpoint and publish it in the run's
        storage (the detached executor: :func:`executor_handle`)."""
        from ray_unlearn.platform.core.engine import UnlearningEngine
        from ray_unlearn.platform.core.run import open_run
        from ray_unlearn.platform.methods import registry

        self.ctx = open_run(storage_uri, run_id)
        cfg = self.ctx.config
        cpus = float(ray.cluster_resources().get("CPU", 1))
        threads = cfg.training.torch_threads  # pinned by the run: retraining must match training
        concurrent = cfg.unlearning.max_concurrent_shards or max(1, int(cpus // threads))
        shards = sorted(self.ctx.model_store.registry().shards)
        # Shard actors mostly wait; the CPU they burn while retraining is bounded by
        # `concurrent`, so they reserve only a sliver of a CPU each and never starve Ray.
        self.backend = RayShards(
            storage_uri,
            run_id,
            shards,
            max_concurrent=concurrent,
            cpus_per_actor=0.01,
            gpus_per_actor=cfg.resources.gpus_per_worker,
            torch_threads=threads,
        )
        self.engine = UnlearningEngine(self.ctx, self.backend, executor_name=name)
        # one engine operation at a time: method calls, and a background restore's publish
        self._lock = threading.RLock()
        self._restoring: set[int] = set()
        self._restore_errors: list[dict[str, Any]] = []
        self._restores = 0
        if background_restore and registry.background_restore(cfg):
            self.engine.restore_hook = self._restore_in_background
        self.settings = {
            "torch_threads": threads,
            "max_concurrent_shards": concurrent,
            "shards": len(shards),
        }
        self._control = start_control(self) if control else None
        if self._control is not None:
            import atexit

            atexit.register(self.close)  # a graceful exit (not ray.kill) removes the file

    def close(self) -> None:
        """Stop the control endpoint and remove its file (if it still names this executor:
        a newer executor of the run may have replaced it). The process's exit does it too."""
        control, self._control = self._control, None
        if control is None:
            return
        control.stop()
        rel = self.ctx.layout.executor_control
        try:
            if self.ctx.storage.read_json(rel).get("instance") == control.instance:
                self.ctx.storage.delete(rel)
        except Exception:  # already gone, or unreadable: clients check liveness anyway
            log.debug("control file %s not removed", rel, exc_info=True)

    def ping(self) -> dict[str, Any]:
        return {"run_id": self.ctx.run_id, **self.settings}

    def forget(
        self, owner_id=None, sample_ids=None, request_id=None, deadline=None
    ) -> dict[str, Any]:
        with self._lock:
            return self.engine.forget(
                owner_id=owner_id, sample_ids=sample_ids, request_id=request_id, deadline=deadline
            ).to_json()

    def forget_request(
        self,
        storage_uri: str,
        owner_id: str | None = None,
        sample_ids: list[int] | None = None,
        request_id: str | None = None,
        deadline: float | None = None,
        strategy: str | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """A client's whole ``forget``: the methods' checks, the durable log entry (and its
        fences), then every unfinished request executed as one batch (``wait=False``: not
        executed, as ``forget --no-wait``); returns :func:`ray_unlearn.api.forget`'s
        document (less the client's own ``seconds``).

        Done here, where the run is open and the shards are loaded, so that a client attached
        to this executor (``ray-unlearn forget --address``) imports and reads nothing of the
        run: no torch, no plan, no log fold in the client. ``storage_uri``: the client's
        storage root (absolute), which must be this executor's."""
        from ray_unlearn.api import check_wait, forget_document
        from ray_unlearn.platform.methods import check_request

        if storage_uri.rstrip("/") != self.ctx.storage.uri.rstrip("/"):
            raise ValueError(
                f"run {self.ctx.run_id}'s executor on this cluster serves storage root "
                f"{self.ctx.storage.uri}, not {storage_uri} (--storage): use that root"
            )
        check_wait(wait, strategy)
        if not wait:
            # Logged without the engine's lock, so an execution in progress (minutes) does
            # not hold up the acknowledgement: the same concurrency as a --no-wait client
            # logging from its own process, which the log and the fences are built for (the
            # DeletionLog is thread-safe; the plan it checks against is never changed).
            t0 = time.perf_counter()
            record, created = self.engine.submit(
                owner_id=owner_id, sample_ids=sample_ids, request_id=request_id, deadline=deadline
            )
            ack_s = time.perf_counter() - t0
            final = self.ctx.deletion_log.get(record.request.request_id)
            doc = forget_document(self.ctx.run_id, record, final, created, ack_s)
            return {**doc, "executor_seconds": time.perf_counter() - t0}
        with self._lock:
            t0 = time.perf_counter()
            check_request(self.ctx, strategy, owner_id, sample_ids)
            record, created = self.engine.submit(
                owner_id=owner_id, sample_ids=sample_ids, request_id=request_id, deadline=deadline
            )
            ack_s = time.perf_counter() - t0
            if record.state.value != "done":
                self.engine.execute_pending(strategy)
            final = self.ctx.deletion_log.get(record.request.request_id)
            doc = forget_document(self.ctx.run_id, record, final, created, ack_s)
            # this executor's own wall time for the whole request (what a client adds on
            # top of it is its own: start, imports, attaching; benchmarks/unlearning_speed.py)
            return {**doc, "executor_seconds": time.perf_counter() - t0}

    def execute_pending(
        self, strategy: str | None = None, request_ids: list[str] | None = None
    ) -> list[dict[str, Any]]:
        with self._lock:
            return [r.to_json() for r in self.engine.execute_pending(strategy, request_ids)]

    # -- S3T background restoration ------------------------------------------------------
    def _restore_in_background(self, plan: dict[str, Any], request_ids: list[str]) -> None:
        """``engine.restore_hook``: retrain ``plan["shards"]`` in a thread, publish after."""
        with self._lock:
            shards = [k for k in plan["shards"] if k not in self._restoring]
            if not shards:
                return
            self._restoring.update(shards)
        plan = {**plan, "shards": shards}
        threading.Thread(
            target=self._restore_and_publish,
            args=(plan, list(request_ids)),
            name=f"restore-{'-'.join(map(str, shards))}",
            daemon=True,
        ).start()

    def _restore_and_publish(self, plan: dict[str, Any], request_ids: list[str]) -> None:
        t0 = time.perf_counter()
        try:
            restored = self.backend.restore(plan["shards"], request_ids)
            with self._lock:
                self.engine.publish_restored(plan, restored, request_ids, time.perf_counter() - t0)
                self._restores += 1
        except Exception as e:  # reported by restore_status; the shards keep serving
            log.exception("background restore of shards %s failed", plan["shards"])
            with self._lock:
                self._restore_errors.append(
                    {"shards": plan["shards"], "error": f"{type(e).__name__}: {e}"}
                )
        finally:
            with self._lock:
                self._restoring.difference_update(plan["shards"])

    def restore_status(self) -> dict[str, Any]:
        """Background restoration: shards retraining now, restores finished, the last one."""
        with self._lock:
            return {
                "restoring": sorted(self._restoring),
                "restores_done": self._restores,
                "last": self.engine.last_restore,
                "errors": list(self._restore_errors),
            }

    def status(self, request_id: str) -> dict[str, Any]:
        return self.ctx.deletion_log.get(request_id).to_json()

    def audit(self, owner_id=None, sample_id=None) -> dict[str, Any]:
        from ray_unlearn.platform.core.audit import audit

        return audit(self.ctx, owner_id=owner_id, sample_id=sample_id)

    def retrain_from_scratch(self) -> dict[str, Any]:
        """Time a from-scratch retrain of every live shard (nothing is published)."""
        import time

        t0 = time.perf_counter()
        res = self.backend.retrain_from_scratch()
        return {
            "seconds": time.perf_counter() - t0,
            "train_seconds": sum(r["train_seconds"] for r in res),
            "shards": len(res),
        }

    def predict_proba(self, features) -> dict[int, np.ndarray]:
        return self.backend.predict_proba(features)

    def test_accuracy(self) -> float:
        deleted = self.ctx.deletion_log.deleted_sample_ids()
        test = self.ctx.split_records("test", deleted)
        probs = self.backend.predict_proba(test.features)
        from ray_unlearn.platform.eval.accuracy import ensemble_accuracy

        return ensemble_accuracy(probs, test.labels, self.ctx.config.unlearning.aggregation)


def control_host() -> str | None:
    """Where the control endpoint listens: ``RAY_UNLEARN_CONTROL_HOST`` if set (``off``: no
    endpoint; ``127.0.0.1``: clients on this node only), else this Ray node's address, which
    the cluster's other nodes reach (Ray's own ports are open between them)."""
    host = os.environ.get("RAY_UNLEARN_CONTROL_HOST", "").strip()
    if host.lower() == "off":
        return None
    return host or ray.util.get_node_ip_address()


def start_control(executor: Executor):
    """Serve ``executor``'s control endpoint (:mod:`ray_unlearn.train.control`) and publish
    its URL and token in the run's storage; None when ``RAY_UNLEARN_CONTROL_HOST=off`` or it
    cannot start (clients then attach through Ray, as before)."""
    from ray_unlearn.train.control import ControlServer

    host = control_host()
    if host is None:
        return None
    ctx = executor.ctx
    identity = {
        "run_id": ctx.run_id,
        "storage": ctx.storage.uri,
        "executor": executor.engine.executor_name,
        "pid": os.getpid(),
    }
    try:
        server = ControlServer(host, executor.forget_request, identity).start()
    except OSError:  # e.g. the address is not this host's: Ray attach still works
        log.exception("control endpoint on %s not started", host)
        return None
    try:
        ctx.storage.write_json(ctx.layout.executor_control, server.record())
    except Exception:
        server.stop()
        raise
    log.info("control endpoint of run %s at %s", ctx.run_id, server.url)
    return server


class _ActorProxy:
    """Calls a detached executor actor's methods as if it were local (blocking)."""

    def __init__(self, handle):
        self._handle = handle

    def __getattr__(self, name):
        method = getattr(self._handle, name)
        return lambda *a, **kw: ray.get(method.remote(*a, **kw))


def executor_handle(storage_uri: str, run_id: str):
    """The run's named detached executor actor, created on first use and shared after that
    by every ``forget`` client and the serving gateway (one executor per run: its calls run
    one at a time, so two clients never retrain the same shard at once). It serves the
    control endpoint (:func:`start_control`) where ``RAY_UNLEARN_CONTROL_HOST`` says, in the
    environment of the process that creates it (or of the cluster's nodes)."""
    opts: dict[str, Any] = {}
    if "RAY_UNLEARN_CONTROL_HOST" in os.environ:
        env = {"RAY_UNLEARN_CONTROL_HOST": os.environ["RAY_UNLEARN_CONTROL_HOST"]}
        opts["runtime_env"] = {"env_vars": env}
    return (
        ray.remote(Executor)
        .options(
            name=executor_actor_name(run_id),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=1,
            **opts,
        )
        .remote(storage_uri, run_id, executor_actor_name(run_id), True, True)
    )


def get_executor(storage_uri: str, run_id: str, *, detached: bool):
    """The run's executor: the named detached actor (blocking proxy), or an in-process one."""
    if not detached:
        return Executor(storage_uri, run_id, name="embedded")
    return _ActorProxy(executor_handle(storage_uri, run_id))
