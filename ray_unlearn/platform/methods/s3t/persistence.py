"""S3T's versions in the model store: naming, saving and loading stages, the backbone, and
the serving model of a version id. Layout: see :mod:`ray_unlearn.platform.methods.s3t.runtime`.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from ray_unlearn.platform.core.device import resolve_device, to_cpu_state, usable_device
from ray_unlearn.platform.core.models import build_model, in_module
from ray_unlearn.platform.core.run import RunContext
from ray_unlearn.platform.core.versions import Registry, ShardEntry
from ray_unlearn.platform.methods.s3t.adapters import base_state
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


def training_device(ctx: RunContext) -> torch.device:
    """Where this process trains the run's orders: ``training.device`` resolved as SISA's
    loop does (CUDA set up for deterministic kernels; ``cuda`` without a usable GPU is a
    DeviceError, raised before any training)."""
    return resolve_device(ctx.config.training.device)


def serving_device(ctx: RunContext) -> torch.device:
    """Where this process serves the run's stage models: a GPU it may use unless the run
    says ``training.device: cpu``, else the CPU (as the Serve shard replicas decide)."""
    return usable_device(ctx.config.training.device)


def stage_version(shard: int, order_index: int, stage: int, generation: int) -> str:
    return f"s{shard:03d}-o{order_index:02d}-t{stage:02d}-g{generation:04d}"


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
            "targets": st.wrapped(),
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
        state=to_cpu_state(base_state(system.backbone)),
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
    adapted block names (what the Ray Train job does on its driver before its workers
    start). It trains on a GPU the driver may use, else on the CPU, whatever
    ``training.device`` says unless it says ``cpu``: the driver is granted no GPU by Ray
    and need not have one, and nothing exact depends on where the backbone, trained once
    and never retrained, was trained (the stored weights are CPU tensors)."""
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
        run.model,
        ctx.feature_shape,
        ctx.num_classes,
        public,
        cfg,
        run.seed,
        device=serving_device(ctx),
    )
    ctx.model_store.save_version(
        shard=-1,
        stage=0,
        generation=0,
        state=to_cpu_state(base_state(backbone)),
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
    storage_uri: str,
    run_id: str,
    vid: str,
    model_json: str,
    feature_shape,
    num_classes,
    device: str,
) -> nn.Module:
    from ray_unlearn.platform.core.config import ModelConfig
    from ray_unlearn.platform.core.storage import RunLayout, Storage
    from ray_unlearn.platform.core.versions import ModelStore

    model = build_model(ModelConfig.model_validate_json(model_json), feature_shape, num_classes)
    model.load_state_dict(ModelStore(Storage(storage_uri), RunLayout(run_id)).load_state(vid))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()  # loaded on the CPU (stored as CPU tensors), then moved


def load_backbone(
    ctx: RunContext, vid: str = BACKBONE, device: torch.device | str = "cpu"
) -> nn.Module:
    """The run's frozen backbone on ``device``: one shared copy per process and device
    (every order, shard and serving model of the process adapts it, never copies it)."""
    return _backbone(
        ctx.storage.uri,
        ctx.run_id,
        vid,
        ctx.config.model.model_dump_json(),
        ctx.feature_shape,
        ctx.num_classes,
        str(torch.device(device)),
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
        tuple(m.get("targets") or ()),
    )
    return st, m


def load_serving_model(
    ctx: RunContext, vid: str, device: torch.device | str | None = None
) -> nn.Module:
    """The model a version id serves: a SISA slice snapshot, or an S3T stage (its backbone
    plus the adapters of stages 1..stage of its order, rebuilt by following parents), on
    ``device`` (default: :func:`serving_device`, the device a Serve replica of this process
    predicts on)."""
    device = serving_device(ctx) if device is None else torch.device(device)
    m = ctx.model_store.manifest(vid)
    if m.get("kind") != "s3t-stage":
        model = build_model(ctx.config.model, ctx.feature_shape, ctx.num_classes)
        model.load_state_dict(ctx.model_store.load_state(vid))
        return model.to(device).eval()
    stages = []
    cur = vid
    while cur != BACKBONE:
        st, man = load_stage(ctx, cur)
        stages.append(st)
        cur = man["parent"]
    stages.reverse()
    return model_for(load_backbone(ctx, device=device), stages, len(stages))


# -- the executor's shard runtime -------------------------------------------------------------
