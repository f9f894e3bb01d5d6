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
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from ray_unlearn.platform.core.models import build_model, in_module
from ray_unlearn.platform.core.run import RunContext
from ray_unlearn.platform.core.training import configure_threads, predict_proba
from ray_unlearn.platform.core.versions import Registry, ShardEntry
from ray_unlearn.platform.methods.s3t.orders import best_order
from ray_unlearn.platform.methods.s3t.training import (
    S3TConfig,
    S3TShard,
    S3TStage,
    S3TSystem,
    model_for,
    public_mask,
    train_s3t,
)

KIND = "s3t"
BACKBONE = "backbone-g0000"


def is_s3t(ctx: RunContext) -> bool:
    return ctx.config.unlearning.strategy == KIND


def s3t_config(ctx: RunContext) -> S3TConfig:
    return ctx.config.s3t or S3TConfig()


def stage_version(shard: int, order_index: int, stage: int, generation: int) -> str:
    return f"s{shard:03d}-o{order_index:02d}-t{stage:02d}-g{generation:04d}"


from ray_unlearn.platform.eval.accuracy import VALIDATION_STREAM  # noqa: E402


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


def public_sample_ids(ctx: RunContext) -> np.ndarray:
    """The training samples that pre-train the backbone (declared not subject to deletion)."""
    train = ctx.plan.shards >= 0
    owners = ctx.plan.owner_ids[train]
    return np.sort(
        ctx.plan.sample_ids[train][
            public_mask(owners, s3t_config(ctx).public_fraction, ctx.config.seed)
        ]
    )


# -- persistence ------------------------------------------------------------------------------
def save_stage(
    ctx: RunContext, shard: int, st: S3TStage, generation: int, parent: str, created_by: str
) -> str:
    vid = stage_version(shard, st.order_index, st.stage, generation)
    ctx.model_store.save_version(
        shard=shard,
        stage=st.stage,
        generation=generation,
        state=st.tensors(),
        sample_ids=st.sample_ids,
        parent=parent,
        metrics=st.metrics,
        config_digest=ctx.config_digest,
        created_by=created_by,
        vid=vid,
        extra={
            "kind": "s3t-stage",
            "order_index": st.order_index,
            "order": list(st.order),
            "block": st.block,
            "adapter": st.adapter,
            "lora_rank": st.lora_rank,
            "lora_alpha": st.lora_alpha,
        },
    )
    return vid


def shard_entry(sh: S3TShard, versions: dict[str, str], generation: int) -> ShardEntry:
    """The registry entry of an S3T shard; ``versions``: "b/i" -> version id of every stage."""
    chain = [
        versions[f"{b}/{i + 1}"]
        for b, snaps in enumerate(sh.snapshots)
        for i, s in enumerate(snaps)
        if s is not None
    ]
    serving = None if sh.dead else versions[f"{sh.order_index}/{sh.prefix}"]
    meta = {
        "kind": KIND,
        "orders": [list(o) for o in sh.orders],
        "dead_slices": sorted(sh.dead_slices),
        "order_index": sh.order_index,
        "prefix": sh.prefix,
        "versions": versions,
        "backbone": BACKBONE,
    }
    return ShardEntry(chain, generation, sh.dead, serving, meta)


def persist_system(ctx: RunContext, system: S3TSystem, created_by: str) -> Registry:
    """Write the backbone and every stage of every shard (generation 0) and the registry."""
    ctx.model_store.save_version(
        shard=-1,
        stage=0,
        generation=0,
        state=system.backbone.state_dict(),
        sample_ids=system.public_ids,
        parent=None,
        metrics={"seconds": system.seconds},
        config_digest=ctx.config_digest,
        created_by=created_by,
        vid=BACKBONE,
        extra={"kind": "s3t-backbone", "blocks": system.blocks},
    )
    reg = Registry(shared=[BACKBONE])
    for k, sh in system.shards.items():
        reg.shards[k] = shard_entry(sh, _save_orders(ctx, k, sh, 0, created_by), 0)
    ctx.model_store.write_registry(reg)
    return reg


def _save_orders(
    ctx: RunContext, shard: int, sh: S3TShard, generation: int, created_by: str
) -> dict[str, str]:
    """Save every retained stage; a retired one (None) is never written."""
    versions = {}
    for b, snaps in enumerate(sh.snapshots):
        parent = BACKBONE
        for st in snaps:
            if st is None:
                break  # stages after a retired one are retired too (prefix property)
            parent = versions[f"{b}/{st.stage}"] = save_stage(
                ctx, shard, st, generation, parent, created_by
            )
    return versions


def pretrain_and_save_backbone(ctx: RunContext, created_by: str) -> tuple[nn.Module, list[str]]:
    """Pre-train the backbone on the public split, freeze it, store it; returns it and the
    adapted block names (what the Ray Train job does before its workers start)."""
    from ray_unlearn.platform.core.training import init_model
    from ray_unlearn.platform.methods.s3t.training import (
        BACKBONE_STREAM,
        check_s3t,
        pretrain_backbone,
        shard_data_from,
    )

    cfg, run = s3t_config(ctx), ctx.config
    t0 = time.perf_counter()
    blocks = check_s3t(
        cfg,
        init_model(run.model, ctx.feature_shape, ctx.num_classes, run.seed, BACKBONE_STREAM),
        ctx.plan.num_slices,
    )
    public_ids = public_sample_ids(ctx)
    recs = ctx.records.subset(ctx.records.index_of(public_ids))
    public = shard_data_from(recs.features, recs.labels, public_ids, BACKBONE_STREAM)
    backbone = pretrain_backbone(
        run.model, ctx.feature_shape, ctx.num_classes, public, cfg, run.seed
    )
    ctx.model_store.save_version(
        shard=-1,
        stage=0,
        generation=0,
        state=backbone.state_dict(),
        sample_ids=public_ids,
        parent=None,
        metrics={"seconds": time.perf_counter() - t0},
        config_digest=ctx.config_digest,
        created_by=created_by,
        vid=BACKBONE,
        extra={"kind": "s3t-backbone", "blocks": blocks},
    )
    return backbone, blocks


def fresh_entry(orders: list[list[int]], versions: dict[str, str]) -> ShardEntry:
    """Registry entry of a freshly trained shard: every stage live, order 0 serves fully."""
    L = len(orders[0])
    meta = {
        "kind": KIND,
        "orders": orders,
        "dead_slices": [],
        "order_index": 0,
        "prefix": L,
        "versions": versions,
        "backbone": BACKBONE,
    }
    return ShardEntry(list(versions.values()), 0, False, versions[f"0/{L}"], meta)


def train_s3t_run(ctx: RunContext) -> dict[str, Any]:
    """Train an S3T run in this process (no Ray) and record it."""
    t0 = time.perf_counter()
    system = train_s3t(ctx, s3t_config(ctx))
    persist_system(ctx, system, created_by="train-local")
    return {"run_id": ctx.run_id, "train_seconds": time.perf_counter() - t0}


# -- loading ----------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _backbone(
    storage_uri: str, run_id: str, vid: str, model_json: str, feature_shape, num_classes
) -> nn.Module:
    from ray_unlearn.platform.core.config import ModelConfig
    from ray_unlearn.platform.core.storage import RunLayout, Storage
    from ray_unlearn.platform.core.versions import ModelStore

    model = build_model(ModelConfig.model_validate_json(model_json), feature_shape, num_classes)
    model.load_state_dict(ModelStore(Storage(storage_uri), RunLayout(run_id)).load_state(vid))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_backbone(ctx: RunContext, vid: str = BACKBONE) -> nn.Module:
    return _backbone(
        ctx.storage.uri,
        ctx.run_id,
        vid,
        ctx.config.model.model_dump_json(),
        ctx.feature_shape,
        ctx.num_classes,
    )


def load_stage(ctx: RunContext, vid: str) -> tuple[S3TStage, dict[str, Any]]:
    m = ctx.model_store.manifest(vid)
    state = ctx.model_store.load_state(vid)
    head = {k: v for k, v in state.items() if in_module(k, ctx.config.model.parts.head)}
    adapter = {k: v for k, v in state.items() if k not in head}
    st = S3TStage(
        m["order_index"],
        tuple(m["order"]),
        m["slice"],
        m["block"],
        m["adapter"],
        m["lora_rank"],
        m["lora_alpha"],
        adapter,
        head,
        ctx.model_store.sample_ids(vid),
        m["metrics"],
    )
    return st, m


def load_serving_model(ctx: RunContext, vid: str) -> nn.Module:
    """The model a version id serves: a SISA slice snapshot, or an S3T stage (its backbone
    plus the adapters of stages 1..stage of its order, rebuilt by following parents)."""
    m = ctx.model_store.manifest(vid)
    if m.get("kind") != "s3t-stage":
        model = build_model(ctx.config.model, ctx.feature_shape, ctx.num_classes)
        model.load_state_dict(ctx.model_store.load_state(vid))
        return model.eval()
    stages = []
    cur = vid
    while cur != BACKBONE:
        st, man = load_stage(ctx, cur)
        stages.append(st)
        cur = man["parent"]
    stages.reverse()
    return model_for(load_backbone(ctx), stages, len(stages))


# -- the executor's shard runtime -------------------------------------------------------------
class S3TShardRuntime:
    """Same interface as :class:`ray_unlearn.platform.core.runtime.ShardRuntime`, for S3T runs."""

    def __init__(self, ctx: RunContext, shard: int, deleted=()):
        configure_threads(ctx.config.training.torch_threads)
        self.ctx, self.shard = ctx, shard
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
            load_backbone(self.ctx),
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
            load_backbone(self.ctx),
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
            load_backbone(self.ctx),
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
