"""S3T: sequence-aware sharded sliced training with LoRA adapters (the domain core).

A backbone built by the model factory is pre-trained on a *public* part of the training
data (declared not subject to deletion), then frozen. Each shard trains B slice orders
(see :mod:`ray_unlearn.platform.methods.s3t.orders`); an order ``(S_1..S_R)`` of the shard's R
slices is trained in R stages, and stage i trains, on the union ``S_1..S_i``:

* one LoRA adapter on the i-th group of blocks counted from the top (one block when the
  number of blocks equals R: ``block_names[R - i]``, the list being bottom-up; see
  :func:`~ray_unlearn.platform.methods.s3t.adapters.stage_groups`), and
* the model's head (``model.parts.head``; its own tensors per order),

with everything else fixed. A snapshot after each stage holds that stage's adapter and
head weights and the ids it was trained on.

Adapters, blocks and the stage-p model: :mod:`ray_unlearn.platform.methods.s3t.adapters`.

Isolation. A stage's optimizer receives only its own adapter's parameters (selected by the
exact adapter-name component of the parameter names) and the head's; every other
parameter has ``requires_grad=False`` and is in no optimizer, so it cannot change
(tests/platform/methods/s3t/test_s3t.py and test_s3t_transformer.py check every parameter
bitwise after every stage).

Deletion by deactivation. The stage-p model of an order is the backbone plus the adapters
of stages 1..p plus the head of stage p (:func:`model_for`), a function of slices
``S_1..S_p`` and the public data only. A deleted sample in slice ``S_j`` leaves stages
1..j-1 usable; the shard serves the order with the longest surviving prefix and retires
(drops the weights of) every stage trained on a deleted sample. No training happens.

Randomness is a function of (seed, shard, order index, stage, pass), as in
:mod:`ray_unlearn.platform.core.training`: the adapter's initial weights of (seed, shard, order,
stage), the batch order of (seed, shard, order, stage, pass) over the stage's rows sorted
by sample id. So a stage-p model is exactly what training the order on its first p
slices alone would give.

Device. An order trains where the shared backbone is; whoever trains puts it on
``training.device`` resolved by :func:`~ray_unlearn.platform.core.device.resolve_device`
(:func:`train_s3t` here; the shard runtime and the Ray Train job via
``persistence.training_device``), which also turns CUDA's deterministic kernels on. Adapter
weights are drawn on the CPU generator and moved, so they are the same on every device;
snapshots are CPU tensors (docs/gpu.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ray_unlearn.platform.core.device import module_device, resolve_device, to_cpu_state
from ray_unlearn.platform.core.training import (
    ShardData,
    configure_threads,
    derive_seed,
    init_model,
    predict_proba,
    run_steps,
    stage_batches,
    stage_steps,
)

# re-exported (`X as X`): the S3T domain API is importable from this module
from ray_unlearn.platform.methods.s3t.adapters import (
    S3TConfigError as S3TConfigError,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    S3TStage as S3TStage,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    StageModel as StageModel,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    _activate as _activate,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    _freeze as _freeze,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    _inject as _inject,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    adapter_name as adapter_name,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    adapter_parameters as adapter_parameters,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    block_targets as block_targets,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    check_s3t as check_s3t,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    default_block_names as default_block_names,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    ensure_slot as ensure_slot,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    head_parameters as head_parameters,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    init_adapter as init_adapter,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    model_for as model_for,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    renamed as renamed,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    stage_block as stage_block,
)
from ray_unlearn.platform.methods.s3t.adapters import (
    stage_groups as stage_groups,
)
from ray_unlearn.platform.methods.s3t.backbone import (
    BACKBONE_STREAM as BACKBONE_STREAM,
)
from ray_unlearn.platform.methods.s3t.backbone import (
    full_finetune as full_finetune,
)
from ray_unlearn.platform.methods.s3t.backbone import (
    pretrain_backbone as pretrain_backbone,
)
from ray_unlearn.platform.methods.s3t.backbone import (
    public_mask as public_mask,
)
from ray_unlearn.platform.methods.s3t.backbone import (
    shard_data_from as shard_data_from,
)
from ray_unlearn.platform.methods.s3t.config import S3TConfig
from ray_unlearn.platform.methods.s3t.orders import (
    Order,
    best_order,
    select_orders,
    surviving_prefix,
)

_ADAPTER_INIT, _S3T_BATCHES = 0x4C4F5241, 0x53335442  # "LORA" "S3TB"


# -- one order -----------------------------------------------------------------------------


def _check_order(order: Sequence[int], num_slices: int) -> Order:
    order = tuple(int(s) for s in order)
    if sorted(order) != list(range(num_slices)):
        raise ValueError(f"an order must be a permutation of 0..{num_slices - 1}, got {order}")
    return order


def train_order(
    backbone: nn.Module,
    data: ShardData,
    order: Sequence[int],
    order_index: int,
    cfg: S3TConfig,
    *,
    seed: int,
    blocks: Sequence[str],
    on_stage: Callable[[S3TStage, nn.Module], None] | None = None,
) -> list[S3TStage]:
    """Train one order's R stages on the frozen, shared ``backbone`` (never copied: the
    order's adapters are named slots in it, their weights the order's own tensors).

    ``on_stage(snapshot, model)`` is called after each stage with the live model (tests
    use it to check isolation and exactness)."""
    stages: list[S3TStage] = []
    for snap, model in iter_order_stages(
        backbone, data, order, order_index, cfg, seed=seed, blocks=blocks
    ):
        if on_stage is not None:
            on_stage(snap, model)
        stages.append(snap)
    return stages


def iter_order_stages(
    backbone: nn.Module,
    data: ShardData,
    order: Sequence[int],
    order_index: int,
    cfg: S3TConfig,
    *,
    seed: int,
    blocks: Sequence[str],
) -> Iterator[tuple[S3TStage, nn.Module]]:
    """Train one order stage by stage, yielding ``(snapshot, live model)`` after each.

    Orders are independent (each trains its own adapter and head tensors, with its own seed
    streams; the shared backbone is only read), so callers may interleave several orders' generators stage by stage (the Ray
    Train job reports one checkpoint per stage round that way) with the same results as
    :func:`train_order`."""
    R = data.num_slices
    order = _check_order(order, R)
    groups = stage_groups(blocks, R)  # raises when fewer blocks than slices
    base = _freeze(backbone)  # shared: adapters are slots in it, weights live in `model`
    # the order trains where the backbone is (the caller put it on training.device); the
    # adapters' and head's tensors and each stage's rows go there, snapshots come back
    dev = module_device(base)
    head = {k: v.detach().clone() for k, v in head_parameters(base).items()}
    model = StageModel(base, [], head)
    batch_seed = derive_seed(seed, _S3T_BATCHES, order_index)
    for stage in range(1, R + 1):
        group, name = groups[stage - 1], adapter_name(order_index, stage)
        targets = [t for b in reversed(group) for t in block_targets(base, b, cfg.lora_targets)]
        slot_name, slot = ensure_slot(base, name, targets, cfg.lora_rank, cfg.lora_alpha)
        init_seed = derive_seed(seed, data.shard, order_index, stage, _ADAPTER_INIT)
        # drawn under the adapter's own name: the same weights whatever slot it lands in
        own = renamed(init_adapter(renamed(slot, slot_name, name), init_seed), name, slot_name)
        own = {k: v.to(dev) for k, v in own.items()}  # drawn on the CPU: the same on any device
        model.adapters.append(slot_name)
        for t in model.tensors.values():
            t.requires_grad_(False)  # earlier stages' adapters: fixed from now on
        model.tensors.update(own)
        params = {**own, **{k: model.tensors[k] for k in head}}
        for p in params.values():
            p.requires_grad_(True)

        in_stage = np.isin(data.slices, order[:stage])
        rows = np.flatnonzero(in_stage)
        new = int((data.slices == order[stage - 1]).sum())
        steps = stage_steps(new, cfg.epochs, cfg.batch_size) if len(rows) else 0
        t0 = time.perf_counter()
        opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
        idx_all = torch.from_numpy(rows)
        # the stage's rows, once, on the device: batches index them there
        x_all, y_all = data.features[idx_all].to(dev), data.labels[idx_all].to(dev)
        batches = stage_batches(len(rows), steps, cfg.batch_size, batch_seed, data.shard, stage)
        loss_sum, seen = run_steps(model, opt, x_all, y_all, batches)
        for p in params.values():
            p.requires_grad_(False)
        block = "+".join(reversed(group))  # bottom to top, like `blocks`
        snap = S3TStage(
            order_index=order_index,
            order=order,
            stage=stage,
            block=block,
            adapter=name,
            lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            # CPU copies: checkpoints do not depend on where they were trained
            adapter_state=renamed(
                to_cpu_state({k: model.tensors[k] for k in slot}), slot_name, name
            ),
            head_state=to_cpu_state({k: model.tensors[k] for k in head}),
            sample_ids=data.sample_ids[in_stage].copy(),
            metrics={
                "loss": loss_sum / seen if seen else float("nan"),
                "steps": float(steps),
                "train_rows": float(len(rows)),
                "seconds": time.perf_counter() - t0,
                "cuda": float(dev.type == "cuda"),  # where it ran, kept in the manifest
            },
            targets=tuple(targets) if targets != [block] else (),
        )
        yield snap, model


# -- a shard -------------------------------------------------------------------------------


class S3TShard:
    """One shard's B orders, their stage snapshots, and the slices hit by deletions.

    ``snapshots[b][i-1]`` is order b's stage-i snapshot, or None once retired (trained on a
    deleted sample). Serving uses :func:`best_order` over the surviving prefixes.
    """

    def __init__(
        self,
        shard: int,
        backbone: nn.Module,
        orders: Sequence[Sequence[int]],
        snapshots: Sequence[Sequence[S3TStage | None]],
        sample_ids: np.ndarray,
        slices: np.ndarray,
        retrain_depth_threshold: int = 1,
    ):
        if len(orders) != len(snapshots) or not orders:
            raise ValueError("one snapshot list per order is needed, and at least one order")
        if any(len(s) != len(o) for o, s in zip(orders, snapshots, strict=True)):
            raise ValueError("every order needs one snapshot per stage (L of them)")
        self.shard, self.backbone = shard, backbone
        self.orders: list[Order] = [tuple(int(s) for s in o) for o in orders]
        self.snapshots: list[list[S3TStage | None]] = [list(s) for s in snapshots]
        ids = np.asarray(sample_ids, dtype=np.int64)
        perm = np.argsort(ids, kind="stable")
        self.sample_ids, self.slices = ids[perm], np.asarray(slices, dtype=np.int32)[perm]
        self._slice_of = dict(zip(self.sample_ids.tolist(), self.slices.tolist(), strict=True))
        self.retrain_depth_threshold = retrain_depth_threshold
        self.dead_slices: set[int] = set()
        self.deleted_ids: set[int] = set()
        self._models: dict[tuple[int, int], nn.Module] = {}
        self.order_index, self.prefix = best_order(self.orders, self.dead_slices)

    @classmethod
    def train(
        cls,
        backbone: nn.Module,
        data: ShardData,
        cfg: S3TConfig,
        *,
        seed: int,
        blocks: Sequence[str],
        orders: Sequence[Sequence[int]] | None = None,
    ) -> S3TShard:
        """Train the shard's orders (``select_orders`` from ``cfg`` when None)."""
        if orders is None:
            orders = select_orders(cfg.selection, data.num_slices, cfg.budget, cfg.deletion_prior)
        snaps = [
            train_order(backbone, data, o, b, cfg, seed=seed, blocks=blocks)
            for b, o in enumerate(orders)
        ]
        return cls(
            data.shard,
            backbone,
            orders,
            snaps,
            data.sample_ids,
            data.slices,
            cfg.retrain_depth_threshold,
        )

    # -- state ---------------------------------------------------------------------------
    @property
    def num_slices(self) -> int:
        return len(self.orders[0])

    @property
    def dead(self) -> bool:
        """No usable stage: the shard leaves the ensemble until it is retrained."""
        return self.prefix == 0

    @property
    def needs_retrain(self) -> bool:
        return self.prefix < self.retrain_depth_threshold

    def prefixes(self) -> list[int]:
        return [surviving_prefix(o, self.dead_slices) for o in self.orders]

    def serving_stages(self) -> list[S3TStage]:
        """The snapshots the shard serves from (stages 1..prefix of the best order)."""
        return [s for s in self.snapshots[self.order_index][: self.prefix] if s is not None]

    def retained_sample_ids(self) -> np.ndarray:
        """Ids of every sample some retained (not retired) snapshot was trained on."""
        kept = [s.sample_ids for snaps in self.snapshots for s in snaps if s is not None]
        return np.unique(np.concatenate(kept)) if kept else np.empty(0, dtype=np.int64)

    # -- deletion ------------------------------------------------------------------------
    def delete(self, sample_ids) -> dict[str, Any]:
        """Deactivate every stage trained on ``sample_ids`` (ids of this shard); no training.

        Unknown ids raise (and change nothing); ids deleted before are ignored. Returns what
        was deactivated, the new serving order and prefix, and the elapsed seconds."""
        t0 = time.perf_counter()
        ids = sorted(set(np.asarray(sample_ids, dtype=np.int64).reshape(-1).tolist()))
        unknown = [i for i in ids if i not in self._slice_of]
        if unknown:
            raise ValueError(
                f"sample ids not in shard {self.shard}: {unknown[:5]}"
                + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
            )
        fresh = [i for i in ids if i not in self.deleted_ids]
        hit = sorted({self._slice_of[i] for i in fresh} - self.dead_slices)
        self.deleted_ids.update(fresh)
        self.dead_slices.update(hit)
        deactivated: dict[int, list[int]] = {}
        for b, order in enumerate(self.orders):
            keep = surviving_prefix(order, self.dead_slices)
            gone = [i + 1 for i in range(keep, len(order)) if self.snapshots[b][i] is not None]
            for stage in gone:
                self.snapshots[b][stage - 1] = None  # retired: its weights are dropped
            if gone:
                deactivated[b] = gone
        for key in [
            k for k in self._models if k[1] > surviving_prefix(self.orders[k[0]], self.dead_slices)
        ]:
            del self._models[key]
        self.order_index, self.prefix = best_order(self.orders, self.dead_slices)
        return {
            "shard": self.shard,
            "deleted": fresh,
            "already_deleted": len(ids) - len(fresh),
            "slices_hit": hit,
            "deactivated": deactivated,
            "order": self.order_index,
            "prefix": self.prefix,
            "dead": self.dead,
            "needs_retrain": self.needs_retrain,
            "seconds": time.perf_counter() - t0,
        }

    # -- serving -------------------------------------------------------------------------
    def live_model(self) -> nn.Module | None:
        """The serving model (None when the shard is dead)."""
        if self.dead:
            return None
        key = (self.order_index, self.prefix)
        if key not in self._models:
            self._models[key] = model_for(
                self.backbone, self.snapshots[self.order_index], self.prefix
            )
        return self._models[key]

    def predict_proba(self, features) -> np.ndarray | None:
        """(n, D) -> (n, classes) from the best surviving stage, or None for a dead shard."""
        model = self.live_model()
        if model is None:
            return None
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        return predict_proba(model, x).numpy()


# -- a whole run -----------------------------------------------------------------------------


@dataclass
class S3TSystem:
    """Backbone, public split and every shard of an S3T run (in memory)."""

    cfg: S3TConfig
    backbone: nn.Module
    blocks: list[str]
    public_ids: np.ndarray
    shards: dict[int, S3TShard]
    seconds: float = 0.0

    def delete(self, sample_ids) -> dict[str, Any]:
        """Route deletions to their shards. Public ids raise (they are declared not subject
        to deletion; forgetting them needs a new backbone); ids no shard holds (held-out
        test rows) are reported as ``untrained``. Nothing changes when this raises."""
        t0 = time.perf_counter()
        ids = np.unique(np.asarray(sample_ids, dtype=np.int64).reshape(-1))
        public = ids[np.isin(ids, self.public_ids)]
        if len(public):
            raise ValueError(
                f"sample ids {public[:5].tolist()} are in the public split that pre-trained the "
                f"backbone, declared not subject to deletion; forgetting them needs a new backbone"
            )
        routed = {k: ids[np.isin(ids, s.sample_ids)] for k, s in self.shards.items()}
        routed = {k: v for k, v in routed.items() if len(v)}
        placed = np.concatenate(list(routed.values())) if routed else np.empty(0, np.int64)
        shards = {k: self.shards[k].delete(v) for k, v in sorted(routed.items())}
        return {
            "shards": shards,
            "untrained": np.setdiff1d(ids, placed).tolist(),
            "dead_shards": sorted(k for k, s in self.shards.items() if s.dead),
            "retrain_queue": sorted(k for k, s in self.shards.items() if s.needs_retrain),
            "seconds": time.perf_counter() - t0,
        }

    def predict_proba(self, features) -> dict[int, np.ndarray]:
        """shard -> (n, classes) for every live shard (dead ones leave the ensemble)."""
        out = {k: s.predict_proba(features) for k, s in sorted(self.shards.items())}
        return {k: p for k, p in out.items() if p is not None}


def train_s3t(ctx, cfg: S3TConfig, shards: Sequence[int] | None = None) -> S3TSystem:
    """Pre-train the backbone on the public split of ``ctx``'s training data and train every
    shard's orders on its remaining rows (``ctx``: a :class:`~ray_unlearn.platform.core.run.RunContext`).
    """
    t0 = time.perf_counter()
    run = ctx.config
    # as SISA's driver: a fixed thread count, and the device resolved (CUDA set up for
    # deterministic kernels, or a DeviceError) before any training
    configure_threads(run.training.torch_threads)
    device = resolve_device(run.training.device)
    blocks = check_s3t(
        cfg,
        init_model(run.model, ctx.feature_shape, ctx.num_classes, run.seed, BACKBONE_STREAM),
        ctx.plan.num_slices,
    )
    train = ctx.split_records("train")
    is_public = public_mask(train.owner_ids, cfg.public_fraction, run.seed)
    public_ids = train.sample_ids[is_public]
    public = shard_data_from(
        train.features[is_public], train.labels[is_public], public_ids, BACKBONE_STREAM
    )
    backbone = pretrain_backbone(
        run.model, ctx.feature_shape, ctx.num_classes, public, cfg, run.seed, device=device
    )
    orders = select_orders(cfg.selection, ctx.plan.num_slices, cfg.budget, cfg.deletion_prior)
    out = {}
    for k in range(run.partition.shards) if shards is None else shards:
        data = ctx.shard_data(k, exclude=public_ids)
        out[k] = S3TShard.train(backbone, data, cfg, seed=run.seed, blocks=blocks, orders=orders)
    return S3TSystem(cfg, backbone, blocks, np.sort(public_ids), out, time.perf_counter() - t0)
