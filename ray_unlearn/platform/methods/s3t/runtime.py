"""S3T runs in the platform: versions in the model store, a shard runtime for the executor,
and loading a serving model from a version id.

Layout in the store (``ray_unlearn.platform.core.versions``):

* ``backbone-g0000``: the frozen backbone, trained on the public split (its manifest lists
  those ids); a *shared* live version of the registry;
* ``s003-o01-t02-g0000``: shard 3, order 1, stage 2 (1-based), generation 0; its manifest
  names the order, the adapted block, the LoRA shape, and its parent (stage 1 of the same
  order, or the backbone), so the serving model of any stage can be rebuilt from its id.

A shard's registry entry keeps every retained stage of every order in ``chain`` (all hold
data, all are audited), the stage that serves (best surviving prefix) in
``serving_version``, and the orders, slices hit and version names in ``meta``. A deletion
deactivates stages (retiring their versions) and trains nothing; when a shard's best prefix
falls below ``s3t.retrain_depth_threshold`` (or the ensemble's validation accuracy below
``s3t.retrain_accuracy_threshold``) the executor retrains its orders afterwards, in the
background: :meth:`S3TShardRuntime.restore` trains a new generation without holding the
shard, so deletions keep being honoured by deactivation meanwhile; adopting the new
generation then deactivates, in it, every stage trained on a sample deleted while it trained.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import torch

from ray_unlearn.platform.core.run import RunContext
from ray_unlearn.platform.core.training import configure_threads, predict_proba
from ray_unlearn.platform.eval.accuracy import VALIDATION_STREAM
from ray_unlearn.platform.methods.s3t.orders import best_order
from ray_unlearn.platform.methods.s3t.persistence import (  # noqa: F401  (re-exported)
    BACKBONE,
    KIND,
    _backbone,
    _save_orders,
    fresh_entry,
    is_s3t,
    load_backbone,
    load_serving_model,
    load_stage,
    persist_system,
    pretrain_and_save_backbone,
    public_sample_ids,
    s3t_config,
    save_stage,
    serving_device,
    shard_entry,
    stage_version,
    train_s3t_run,
    training_device,
)
from ray_unlearn.platform.methods.s3t.training import (
    S3TShard,
)


def validation_records(ctx: RunContext):
    """Held-out rows the accuracy trigger measures: a seeded ``s3t.validation_fraction`` of
    the test split, decided by sample id alone (no training ever sees them)."""
    from ray_unlearn.platform.core.data import held_out_mask
    from ray_unlearn.platform.core.training import derive_seed

    test = ctx.split_records("test")
    pick = held_out_mask(
        test.sample_ids,
        s3t_config(ctx).validation_fraction,
        derive_seed(ctx.config.seed, VALIDATION_STREAM),
    )
    return test.subset(np.flatnonzero(pick))


def restore_candidates(ctx: RunContext, results: dict[int, dict[str, Any]], accuracy=None):
    """Shards to retrain after a batch of S3T deactivations, and why.

    Depth: every shard whose result says ``needs_retrain`` (best prefix below
    ``retrain_depth_threshold``). Accuracy: when ``accuracy`` (a callable returning the
    ensemble's validation accuracy now) is given, ``retrain_accuracy_threshold`` is set and
    the accuracy is below it, every truncated shard (best prefix < L), shallowest first.
    """
    cfg = s3t_config(ctx)
    depth = sorted(k for k, t in results.items() if t.get("needs_retrain"))
    out: dict[str, Any] = {"depth": depth, "accuracy": None, "triggered_by_accuracy": []}
    if cfg.retrain_accuracy_threshold is not None and accuracy is not None and results:
        acc = float(accuracy())
        out["accuracy"] = acc
        if acc < cfg.retrain_accuracy_threshold:
            reg = ctx.model_store.registry()
            truncated = [
                (e.meta.get("prefix", 0), k)
                for k, e in reg.shards.items()
                if e.meta.get("kind") == KIND and e.meta.get("prefix", 0) < len(e.meta["orders"][0])
            ]
            out["triggered_by_accuracy"] = [k for _, k in sorted(truncated) if k not in depth]
    out["shards"] = depth + out["triggered_by_accuracy"]
    return out


class S3TShardRuntime:
    """Same interface as :class:`ray_unlearn.platform.core.runtime.ShardRuntime`, for S3T runs."""

    def __init__(self, ctx: RunContext, shard: int, deleted=()):
        configure_threads(ctx.config.training.torch_threads)
        self.ctx, self.shard = ctx, shard
        # where this shard's orders retrain and predict, as SISA's shard runtime: a 'cuda'
        # run without a GPU fails here, at load, not inside the first restore
        self.device = training_device(ctx)
        self.public = public_sample_ids(ctx)
        # Guards the shard's state: a restore trains outside it, so deactivations (and
        # predictions) are never held up by retraining.
        self._lock = threading.RLock()
        self._load(deleted)

    def _load(self, deleted) -> None:
        entry = self.ctx.model_store.registry().shards.get(self.shard)
        if entry is None or entry.meta.get("kind") != KIND:
            raise ValueError(
                f"shard {self.shard} of run {self.ctx.run_id} has no S3T registry entry: was it trained?"
            )
        self.generation, self.versions = entry.generation, dict(entry.meta["versions"])
        live = set(entry.chain)
        orders = entry.meta["orders"]
        snaps = [
            [
                load_stage(self.ctx, self.versions[f"{b}/{i}"])[0]
                if self.versions.get(f"{b}/{i}") in live
                else None
                for i in range(1, len(o) + 1)
            ]
            for b, o in enumerate(orders)
        ]
        ids, slices = self.ctx.plan.shard_members(self.shard)
        keep = ~np.isin(ids, self.public)
        cfg = s3t_config(self.ctx)
        self.s3t = S3TShard(
            self.shard,
            load_backbone(self.ctx, device=self.device),
            orders,
            snaps,
            ids[keep],
            slices[keep],
            cfg.retrain_depth_threshold,
        )
        self.s3t.dead_slices = set(entry.meta["dead_slices"])
        self.s3t.deleted_ids = set(np.asarray(list(deleted), dtype=np.int64).tolist()) & set(
            ids[keep].tolist()
        )
        self.s3t.order_index, self.s3t.prefix = best_order(self.s3t.orders, self.s3t.dead_slices)

    @property
    def empty(self) -> bool:
        return self.s3t.dead

    def refresh(self) -> bool:
        with self._lock:
            entry = self.ctx.model_store.registry().shards.get(self.shard)
            if entry is not None and entry.generation <= self.generation:
                return False  # ours is as new (an unpublished result is newer, never older)
            self._load(self.ctx.deletion_log.deleted_sample_ids())
            return True

    def info(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "kind": KIND,
            "prefixes": self.s3t.prefixes(),
            "order": self.s3t.order_index,
            "prefix": self.s3t.prefix,
            "generation": self.generation,
            "empty": self.empty,
        }

    def _result(
        self, base: dict[str, Any], retired: list[str], created: list[str], first: int
    ) -> dict[str, Any]:
        entry = shard_entry(self.s3t, self.versions, self.generation)
        return {
            **base,
            "changed": True,
            "empty": entry.empty,
            "first_stage": first,
            "chain": entry.chain,
            "generation": self.generation,
            "created": created,
            "retired": retired,
            "serving": entry.serving_version,
            "meta": entry.meta,
            "exact": True,
            "needs_retrain": self.s3t.needs_retrain,
        }

    def unlearn(self, deleted, strategy: str, request_ids: list[str]) -> dict[str, Any]:
        """Deactivate the stages trained on ``deleted``: no training, microseconds."""
        with self._lock:
            return self._unlearn(deleted, time.perf_counter())

    def _unlearn(self, deleted, t0: float) -> dict[str, Any]:
        self.refresh()
        deleted = np.asarray(deleted, dtype=np.int64)
        public = deleted[np.isin(deleted, self.public)]
        if len(public):
            raise ValueError(
                f"sample ids {public[:5].tolist()} pre-trained the S3T backbone (public split): "
                "not subject to deletion"
            )
        mine = deleted[np.isin(deleted, self.s3t.sample_ids)]
        base = {"shard": self.shard, "strategy": KIND, "deleted": int(len(mine))}
        if not len(mine):
            return {**base, "changed": False, "seconds": time.perf_counter() - t0}
        res = self.s3t.delete(mine)
        retired = [
            self.versions[f"{b}/{i}"] for b, stages in res["deactivated"].items() for i in stages
        ]
        self.generation += 1
        first = (
            min((min(st) for st in res["deactivated"].values()), default=self.s3t.num_slices + 1)
            - 1
        )
        out = self._result(base, retired, [], max(first, 0))
        return {
            **out,
            "train_seconds": 0.0,
            "seconds": time.perf_counter() - t0,
            "deactivation_seconds": res["seconds"],
        }

    def restore(self, request_ids: list[str] | None = None) -> dict[str, Any]:
        """Retrain every order of the shard on its live rows (a new generation).

        Training runs without the shard's lock, on the rows live when it starts; deletions
        that arrive meanwhile are honoured at once on the current generation (deactivation)
        and, when the new generation is adopted, deactivate the stages of it that trained on
        them, so the adopted model never holds a sample deleted before it was published.
        """
        t0 = time.perf_counter()
        with self._lock:
            self.refresh()
            deleted_before = self._deleted_now()
            orders = [list(o) for o in self.s3t.orders]
        cfg = s3t_config(self.ctx)
        data = self.ctx.shard_data(self.shard, exclude=set(self.public.tolist()) | deleted_before)
        blocks = self.ctx.model_store.manifest(BACKBONE)["blocks"]
        new = S3TShard.train(
            load_backbone(self.ctx, device=self.device),
            data,
            cfg,
            seed=self.ctx.config.seed,
            blocks=blocks,
            orders=orders,
        )
        train_s = time.perf_counter() - t0
        with self._lock:  # adopt
            self.refresh()
            ids, slices = self.ctx.plan.shard_members(self.shard)
            keep = ~np.isin(ids, self.public)
            mine = set(ids[keep].tolist())
            new.sample_ids, new.slices = ids[keep], slices[keep]  # deleted ids stay known
            new._slice_of = dict(zip(new.sample_ids.tolist(), new.slices.tolist(), strict=True))
            new.deleted_ids = deleted_before & mine
            late = sorted((self._deleted_now() - deleted_before) & mine)
            if late:  # deleted while the new generation trained: deactivate it there too
                new.delete(np.asarray(late, dtype=np.int64))
            self.generation += 1
            retired = shard_entry(self.s3t, self.versions, self.generation).chain
            self.versions = _save_orders(
                self.ctx, self.shard, new, self.generation, "restore-depth"
            )
            self.s3t = new
            out = self._result(
                {"shard": self.shard, "strategy": KIND, "deleted": 0, "late_deletions": late},
                retired,
                list(self.versions.values()),
                0,
            )
        return {**out, "train_seconds": train_s, "seconds": time.perf_counter() - t0}

    def _deleted_now(self) -> set[int]:
        return set(self.ctx.deletion_log.deleted_sample_ids()) | set(self.s3t.deleted_ids)

    def retrain_from_scratch(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        cfg = s3t_config(self.ctx)
        data = self.ctx.shard_data(
            self.shard, exclude=set(self.public.tolist()) | set(self.s3t.deleted_ids)
        )
        blocks = self.ctx.model_store.manifest(BACKBONE)["blocks"]
        S3TShard.train(
            load_backbone(self.ctx, device=self.device),
            data,
            cfg,
            seed=self.ctx.config.seed,
            blocks=blocks,
            orders=self.s3t.orders,
        )
        s = time.perf_counter() - t0
        return {"shard": self.shard, "seconds": s, "train_seconds": s}

    def predict_proba(self, features: np.ndarray) -> np.ndarray | None:
        with self._lock:
            model = self.s3t.live_model()
        if model is None:
            return None
        return predict_proba(model, torch.tensor(features, dtype=torch.float32)).numpy()
