"""One shard's live state in memory: its rows, its snapshot chain, and what it does with them.

A long-lived worker (a Ray actor in ``ray_unlearn.train.executor``, or the process itself
in tests) holds a :class:`ShardRuntime`, so a deletion pays for retraining and nothing else:
no data loading, no checkpoint download, no cluster start.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ray_unlearn.platform.core.device import resolve_device
from ray_unlearn.platform.core.models import build_model
from ray_unlearn.platform.core.run import RunContext
from ray_unlearn.platform.core.training import (
    ShardHook,
    StageResult,
    configure_threads,
    predict_proba,
    train_run_shard,
    train_shard,
)
from ray_unlearn.platform.core.versions import version_id
from ray_unlearn.platform.methods import registry
from ray_unlearn.platform.methods.base import ShardState, get_strategy

# versions saved at once by persist_stages: each save waits mostly on its 5 fsyncs (GIL free)
_SAVE_THREADS = 8


def persist_stages(
    ctx: RunContext,
    shard: int,
    generation: int,
    stages: list[StageResult],
    parent: str | None,
    created_by: str,
) -> list[str]:
    """Save stage snapshots as versions of ``generation``, each the parent of the next;
    returns their ids in stage order.

    The saves overlap (threads): a version's ids are known before it is written, so no save
    waits for its parent's. Durability is as before: each save returns only once its files
    and folder are fsynced, this function returns only once every save has, and nothing
    publishes the versions before it returns (the registry switch comes after, in the
    engine). What changes is the order in which manifests appear; a crash leaves some of the
    generation's versions and not others, as a crash between serial saves left a prefix, and
    recovery retires any version outside the live chain either way (core/publish.py)."""
    vids = [version_id(shard, st.stage, generation) for st in stages]

    def save(i: int) -> str:
        m = ctx.model_store.save_version(
            shard=shard,
            stage=stages[i].stage,
            generation=generation,
            state=stages[i].state,
            sample_ids=stages[i].sample_ids,
            parent=vids[i - 1] if i else parent,
            metrics=stages[i].metrics,
            config_digest=ctx.config_digest,
            created_by=created_by,
            vid=vids[i],
        )
        return m["version"]

    if len(stages) <= 1:
        return [save(i) for i in range(len(stages))]
    # leaving the block waits for every save, failed or not; result() re-raises a failure
    with ThreadPoolExecutor(min(len(stages), _SAVE_THREADS), "persist-stages") as pool:
        futures = [pool.submit(save, i) for i in range(len(stages))]
    return [f.result() for f in futures]


def make_runtime(ctx: RunContext, shard: int, deleted=()):
    """The shard runtime for the run's kind: SISA slices, or a method's own (the registry's
    ``runtime`` hook)."""
    own = registry.own_runtime(ctx, shard, deleted)
    return own if own is not None else ShardRuntime(ctx, shard, deleted)


def load_serving_model(
    ctx: RunContext, vid: str, device: torch.device | None = None
) -> torch.nn.Module:
    """The model a version id serves: a SISA slice snapshot, or what the run's method builds
    from the id (the registry's ``serving_model`` hook: say, adapters on a backbone), on
    ``device`` (default CPU; checkpoints are CPU tensors, moved after loading)."""
    own = registry.serving_model(ctx, vid)
    if own is not None:
        return own if device is None else own.to(device)
    model = build_model(ctx.config.model, ctx.feature_shape, ctx.num_classes)
    model.load_state_dict(ctx.model_store.load_state(vid))
    return (model if device is None else model.to(device)).eval()


def train_all_shards(ctx: RunContext) -> dict[str, Any]:
    """Train every shard in this process and record generation 0 (no Ray: tests, small runs).

    The Ray Train job (``ray_unlearn.train.job``) does the same work spread over workers.
    """
    # a method that trains the run its own way (a run kind; recorded contributions)
    own = registry.train_run(ctx)
    if own is not None:
        return own
    return train_run(ctx, lambda k: registry.shard_hook(ctx, k))[0]


def train_run(
    ctx: RunContext,
    hook_for: Callable[[int], ShardHook | None] | None = None,
    created_by: str = "train-local",
) -> tuple[dict[str, Any], dict[int, list[str]]]:
    """Every shard through the SISA driver (:func:`train_run_shard`) in this process, its
    stages saved as generation 0 and the registry written. ``hook_for(shard)`` gives the
    shard's hook (or None). Returns the report (run id, seconds, the hooks' summed figures)
    and each shard's chain of versions."""
    from ray_unlearn.platform.core.versions import Registry, ShardEntry

    t0 = time.perf_counter()
    chains, figures = {}, {}
    for k in range(ctx.config.partition.shards):
        hook = hook_for(k) if hook_for is not None else None
        stages = list(train_run_shard(ctx, k, hook=hook))
        chains[k] = persist_stages(ctx, k, 0, stages, None, created_by=created_by)
        for name, v in (hook.summary() if hook is not None else {}).items():
            figures[name] = figures.get(name, 0) + v
    ctx.model_store.write_registry(Registry({k: ShardEntry(c, 0) for k, c in chains.items()}))
    report = {"run_id": ctx.run_id, "train_seconds": time.perf_counter() - t0, **figures}
    return report, chains


class ShardRuntime:
    def __init__(self, ctx: RunContext, shard: int, deleted=()):
        configure_threads(ctx.config.training.torch_threads)
        self.ctx, self.shard = ctx, shard
        # where this shard retrains and predicts; a 'cuda' run without a GPU fails here, at
        # load, not inside the first deletion
        self.device = resolve_device(ctx.config.training.device)
        self._load(deleted)

    def _load(self, deleted) -> None:
        entry = self.ctx.model_store.registry().shards.get(self.shard)
        if entry is None:
            raise ValueError(
                f"shard {self.shard} is not in run {self.ctx.run_id}'s registry: was the run trained?"
            )
        self.data = self.ctx.shard_data(self.shard, exclude=deleted)
        self.chain, self.generation, self.empty = list(entry.chain), entry.generation, entry.empty
        self.snapshots = [self.ctx.model_store.load_state(v) for v in self.chain]
        self._model: torch.nn.Module | None = None

    def refresh(self) -> bool:
        """Reload if another process published a newer generation of this shard (say, a
        one-off ``forget`` run without the cluster): retraining from a stale chain or stale
        rows would bring deleted samples back. Returns True when it reloaded."""
        entry = self.ctx.model_store.registry().shards.get(self.shard)
        if entry is not None and entry.generation == self.generation:
            return False
        self._load(self.ctx.deletion_log.deleted_sample_ids())
        return True

    def info(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "rows": len(self.data),
            "chain": self.chain,
            "generation": self.generation,
            "empty": self.empty,
        }

    def unlearn(self, deleted, strategy: str, request_ids: list[str]) -> dict[str, Any]:
        """Remove ``deleted`` ids (those live in this shard) and publish new versions."""
        t0 = time.perf_counter()
        reloaded = self.refresh()
        t_reload = time.perf_counter() - t0
        deleted = np.asarray(deleted, dtype=np.int64)
        deleted = deleted[np.isin(deleted, self.data.sample_ids)]
        out: dict[str, Any] = {
            "shard": self.shard,
            "strategy": strategy,
            "deleted": int(len(deleted)),
            "reloaded": reloaded,
        }
        if not len(deleted):
            return {**out, "changed": False, "seconds": time.perf_counter() - t0}
        t1 = time.perf_counter()
        remaining = self.data.without(deleted)
        # where the shard's own time beyond training goes (the done record keeps it): the
        # reload check (a reload when another process published), the remaining rows' copy,
        # saving the new versions
        out["parts_seconds"] = {"reload": t_reload, "rows": time.perf_counter() - t1}
        if len(remaining) == 0:
            # Nothing left to learn from: the shard leaves the ensemble until new data comes.
            retired, self.chain, self.snapshots, self.empty = self.chain, [], [], True
            self.data, self._model = remaining, None
            self.generation += 1
            return {
                **out,
                "changed": True,
                "empty": True,
                "first_stage": 0,
                "chain": [],
                "generation": self.generation,
                "created": [],
                "retired": retired,
                "train_seconds": 0.0,
                "exact": True,
                "seconds": time.perf_counter() - t0,
            }
        update = get_strategy(strategy)(self.ctx).unlearn_shard(
            ShardState(self.data, self.snapshots, self.chain), deleted
        )
        train_s = sum(s.metrics.get("seconds", 0.0) for s in update.stages)
        train_cpu = sum(s.metrics.get("cpu_seconds", 0.0) for s in update.stages)
        gen = self.generation + 1
        first = update.first_stage
        parent = self.chain[first - 1] if first > 0 else None
        t2 = time.perf_counter()
        created = persist_stages(
            self.ctx, self.shard, gen, update.stages, parent, created_by=",".join(request_ids)
        )
        out["parts_seconds"]["save"] = time.perf_counter() - t2
        retired = self.chain[first:]
        self.chain = self.chain[:first] + created
        self.snapshots = self.snapshots[:first] + [s.state for s in update.stages]
        self.data, self.generation, self._model = remaining, gen, None
        return {
            **out,
            "changed": True,
            "empty": False,
            "first_stage": first,
            "chain": self.chain,
            "generation": gen,
            "created": created,
            "retired": retired,
            "train_seconds": train_s,
            "train_cpu_seconds": train_cpu,
            "exact": update.exact,
            "info": update.info,
            "seconds": time.perf_counter() - t0,
        }

    def retrain_from_scratch(self) -> dict[str, Any]:
        """Train every stage anew on the live rows and discard the result: the cost a
        deletion would have without slicing and sharding (benchmarks and the demo time it)."""
        t0 = time.perf_counter()
        cfg = self.ctx.config
        stages = train_shard(
            self.data,
            cfg.model,
            cfg.training,
            seed=cfg.seed,
            feature_shape=self.ctx.feature_shape,
            num_classes=self.ctx.num_classes,
        )
        return {
            "shard": self.shard,
            "seconds": time.perf_counter() - t0,
            "train_seconds": sum(s.metrics["seconds"] for s in stages),
        }

    def serving_state(self) -> dict[str, torch.Tensor] | None:
        return None if self.empty else self.snapshots[-1]

    def predict_proba(self, features: np.ndarray) -> np.ndarray | None:
        """(n, D) -> (n, classes), or None for an empty shard."""
        if self.empty:
            return None
        if self._model is None:
            self._model = build_model(
                self.ctx.config.model, self.ctx.feature_shape, self.ctx.num_classes
            )
            self._model.load_state_dict(self.snapshots[-1])
            self._model.to(self.device)
        return predict_proba(self._model, torch.tensor(features, dtype=torch.float32)).numpy()
