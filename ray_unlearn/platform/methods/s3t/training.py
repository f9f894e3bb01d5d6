"""S3T: sequence-aware sharded sliced training with LoRA adapters (the domain core).

A backbone built by the model factory is pre-trained on a *public* part of the training
data (declared not subject to deletion), then frozen. Each shard trains B slice orders
(see :mod:`ray_unlearn.platform.methods.s3t.orders`); an order ``(S_1..S_L)`` is trained in L
stages, and stage i trains, on the union ``S_1..S_i``:

* one LoRA adapter on block i counted from the top (``block_names[L - i]``, the list
  being bottom-up), and
* the model's ``head`` (a full copy per order),

with everything else fixed. A snapshot after each stage holds that stage's adapter and
head weights and the ids it was trained on.

Adapters. One peft adapter per (order, stage), named ``s3t_o{order}_s{stage}``, injected
just before its stage with ``inject_adapter_in_model`` and targeting exactly one block
(``target_modules`` is a regex that must *fully* match the module name, so ``body.1``
never matches ``body.10``). An order's model therefore holds adapters only for the stages
trained so far; each adapted layer holds exactly one adapter, and all of them are active.

Isolation. A stage's optimizer receives only its own adapter's parameters (selected by the
exact adapter-name component of the parameter names) and the head's; every other
parameter has ``requires_grad=False`` and is in no optimizer, so it cannot change
(tests/platform/test_s3t.py checks every parameter bitwise after every stage).

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
"""

from __future__ import annotations

import copy
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ray_unlearn.platform.core.config import ModelConfig, TrainingConfig
from ray_unlearn.platform.core.training import (
    ShardData,
    StateDict,
    derive_seed,
    init_model,
    predict_proba,
    stage_batches,
    stage_steps,
    train_stage,
)
from ray_unlearn.platform.methods.s3t.config import S3TConfig
from ray_unlearn.platform.methods.s3t.orders import (
    Order,
    best_order,
    select_orders,
    surviving_prefix,
)

BACKBONE_STREAM = 0x7FFE  # seed-stream id of the backbone (no real shard has it)
FULL_FINETUNE_STREAM = 0x7FFD  # seed-stream id of the full fine-tuning reference
_ADAPTER_INIT, _S3T_BATCHES, _PUBLIC = 0x4C4F5241, 0x53335442, 0x5055424C  # "LORA" "S3TB" "PUBL"
_ADAPTABLE = (nn.Linear, nn.Conv2d)


class S3TConfigError(ValueError):
    """An S3T config that does not fit the model or the partition; lists every problem."""


# -- blocks and validation ---------------------------------------------------------------


def default_block_names(model: nn.Module) -> list[str]:
    """The factory models' adaptable blocks, bottom to top: the Linear / Conv2d layers of
    ``model.body`` (MLP: ``body.0, body.2, ...``; SmallCNN: its conv layers)."""
    body = getattr(model, "body", None)
    if isinstance(body, nn.Sequential):
        return [f"body.{i}" for i, m in enumerate(body) if isinstance(m, _ADAPTABLE)]
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, _ADAPTABLE) and n.split(".")[0] != "head"
    ]


def check_s3t(cfg: S3TConfig, model: nn.Module, num_slices: int) -> list[str]:
    """Validate ``cfg`` against a (fresh, un-adapted) model and the partition's R slices.

    Returns the block names (bottom to top). Raises :class:`S3TConfigError` listing every
    problem. Names match exactly: ``body.1`` is not ``body.10``.
    """
    problems: list[str] = []
    modules = dict(model.named_modules())
    head = modules.get("head")
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        problems.append("the model needs a trainable `head` module (one copy per order)")
    blocks = list(cfg.block_names) if cfg.block_names is not None else default_block_names(model)
    adaptable = [n for n, m in modules.items() if isinstance(m, _ADAPTABLE)]
    for name in blocks:
        if name not in modules:
            problems.append(
                f"block_names: {name!r} is not a module of the model (exact names); "
                f"adaptable modules: {', '.join(adaptable) or 'none'}"
            )
        elif not isinstance(modules[name], _ADAPTABLE):
            problems.append(
                f"block_names: {name!r} is a {type(modules[name]).__name__}; LoRA blocks must be "
                f"Linear or Conv2d (adaptable: {', '.join(adaptable)})"
            )
        elif name == "head" or name.startswith("head."):
            problems.append(f"block_names: {name!r} is in the head, which every stage trains fully")
    if not blocks:
        problems.append("the model has no adaptable block (Linear/Conv2d outside the head)")
    elif len(blocks) != num_slices:
        problems.append(
            f"S3T adapts one block per slice: L = {len(blocks)} blocks "
            f"({', '.join(blocks)}) must equal the number of slices R = {num_slices}; "
            f"set partition.slices={len(blocks)}, or name {num_slices} blocks in block_names "
            f"(or give the model {num_slices} hidden layers)"
        )
    L = len(blocks) if blocks else num_slices
    if L >= 1 and cfg.budget > math.factorial(L):
        problems.append(
            f"budget: B={cfg.budget} exceeds the {math.factorial(L)} distinct orders of "
            f"L={L} slices; use budget <= {math.factorial(L)}"
        )
    if cfg.retrain_depth_threshold > L:
        problems.append(
            f"retrain_depth_threshold: {cfg.retrain_depth_threshold} exceeds the depth L={L}; "
            f"use 1..{L}"
        )
    if cfg.deletion_prior is not None and len(cfg.deletion_prior) != L:
        problems.append(
            f"deletion_prior: one probability per slice is needed (L={L}), "
            f"got {len(cfg.deletion_prior)}"
        )
    if problems:
        raise S3TConfigError(
            f"invalid S3T config: {len(problems)} problem(s)\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return blocks


def adapter_name(order_index: int, stage: int) -> str:
    """The peft adapter name of (order, 1-based stage)."""
    return f"s3t_o{order_index}_s{stage}"


def stage_block(blocks: Sequence[str], stage: int) -> str:
    """Block trained by 1-based ``stage``: the stage-th from the top (blocks are bottom-up)."""
    return blocks[len(blocks) - stage]


def _exact(names: Sequence[str]) -> str:
    """A ``target_modules`` regex that peft full-matches against module names: exact names."""
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _tuner_layer() -> type:
    from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: peft imports transformers

    return BaseTunerLayer


def _inject(
    model: nn.Module, name: str, block: str, rank: int, alpha: float, init_seed: int
) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=_exact([block]),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,  # A: seeded Kaiming-uniform, B: zeros (a no-op until trained)
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # one adapter per stage is the design, not an accident
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        torch.manual_seed(init_seed)
        inject_adapter_in_model(cfg, model, adapter_name=name)
    layer = dict(model.named_modules()).get(block)
    if not isinstance(layer, _tuner_layer()) or name not in getattr(layer, "lora_A", {}):
        raise RuntimeError(f"adapter {name} was not injected into block {block!r}")


def _activate(model: nn.Module, names: Sequence[str]) -> None:
    """Make exactly ``names`` active (each adapted layer holds one of them); no gradients.

    Every injection re-activates only the newest adapter model-wide, so this is called
    after each one."""
    tuner_layer = _tuner_layer()
    for m in model.modules():
        if isinstance(m, tuner_layer):
            m.set_adapter([n for n in names if n in m.lora_A], inference_mode=True)


def _freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Parameters of adapter ``name``: those with ``name`` as an exact dotted component."""
    return {n: p for n, p in model.named_parameters() if name in n.split(".")}


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.split(".")[0] == "head"}


# -- public data and the backbone --------------------------------------------------------


def public_mask(owner_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the rows whose owner is drawn into the public split (whole owners, about
    ``fraction`` of them, a function of (seed, the sorted owner set))."""
    owners, inverse = np.unique(np.asarray(owner_ids).astype(str), return_inverse=True)
    u = np.random.default_rng(derive_seed(seed, _PUBLIC)).random(len(owners))
    return (u < fraction)[inverse]


def shard_data_from(features, labels, sample_ids, stream: int) -> ShardData:
    """One-slice :class:`ShardData` (for the backbone and the full fine-tuning reference)."""
    return ShardData(
        shard=stream,
        sample_ids=np.asarray(sample_ids, dtype=np.int64),
        slices=np.zeros(len(sample_ids), dtype=np.int32),
        features=torch.as_tensor(np.ascontiguousarray(features), dtype=torch.float32),
        labels=torch.as_tensor(np.asarray(labels, dtype=np.int64)),
        num_slices=1,
    )


def _full_weight_cfg(cfg: S3TConfig, epochs: int) -> TrainingConfig:
    return TrainingConfig(
        epochs=epochs, batch_size=cfg.batch_size, lr=cfg.pretrain_lr, optimizer="adam"
    )


def pretrain_backbone(
    model_cfg: ModelConfig,
    feature_shape,
    num_classes: int,
    public: ShardData,
    cfg: S3TConfig,
    seed: int,
) -> nn.Module:
    """Build the model (seeded), fully fine-tune it on the public rows for
    ``pretrain_epochs`` passes at ``pretrain_lr``, and freeze it."""
    model = init_model(model_cfg, feature_shape, num_classes, seed, BACKBONE_STREAM)
    if cfg.pretrain_epochs > 0 and len(public):
        train_stage(model, public, 0, _full_weight_cfg(cfg, cfg.pretrain_epochs), seed)
    model.eval()
    return _freeze(model)


def full_finetune(backbone: nn.Module, data: ShardData, cfg: S3TConfig, seed: int) -> nn.Module:
    """Reference: every parameter of a copy of the backbone trained on ``data`` (one
    slice) for ``cfg.epochs`` passes at the full-weight rate (``pretrain_lr``)."""
    model = copy.deepcopy(backbone)
    for p in model.parameters():
        p.requires_grad_(True)
    one = ShardData(
        FULL_FINETUNE_STREAM,
        data.sample_ids,
        np.zeros(len(data), dtype=np.int32),
        data.features,
        data.labels,
        1,
    )
    train_stage(model, one, 0, _full_weight_cfg(cfg, cfg.epochs), seed)
    model.eval()
    return _freeze(model)


# -- one order -----------------------------------------------------------------------------


@dataclass
class S3TStage:
    """Snapshot after one stage of one order."""

    order_index: int
    order: Order
    stage: int  # 1-based
    block: str
    adapter: str
    lora_rank: int
    lora_alpha: float
    adapter_state: StateDict  # parameter name in the model -> tensor (this adapter only)
    head_state: StateDict  # "head.weight", "head.bias", ...
    sample_ids: np.ndarray  # ids of slices order[:stage] it was trained on
    metrics: dict[str, float] = field(default_factory=dict)

    def tensors(self) -> StateDict:
        """All weights of the snapshot, flat (for safetensors)."""
        return {**self.adapter_state, **self.head_state}


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
    """Train one order's L stages on a copy of the frozen ``backbone``.

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

    Orders are independent (each trains its own copy of the backbone with its own seed
    streams), so callers may interleave several orders' generators stage by stage (the Ray
    Train job reports one checkpoint per stage round that way) with the same results as
    :func:`train_order`."""
    L = len(blocks)
    order = _check_order(order, L)
    if data.num_slices != L:
        raise ValueError(f"shard {data.shard} has {data.num_slices} slices; S3T needs L={L}")
    model = _freeze(copy.deepcopy(backbone))
    batch_seed = derive_seed(seed, _S3T_BATCHES, order_index)
    active: list[str] = []
    for stage in range(1, L + 1):
        block, name = stage_block(blocks, stage), adapter_name(order_index, stage)
        init_seed = derive_seed(seed, data.shard, order_index, stage, _ADAPTER_INIT)
        _inject(model, name, block, cfg.lora_rank, cfg.lora_alpha, init_seed)
        active.append(name)
        _activate(model, active)
        _freeze(model)
        params = {**adapter_parameters(model, name), **head_parameters(model)}
        for p in params.values():
            p.requires_grad_(True)

        in_stage = np.isin(data.slices, order[:stage])
        rows = np.flatnonzero(in_stage)
        new = int((data.slices == order[stage - 1]).sum())
        steps = stage_steps(new, cfg.epochs, cfg.batch_size) if len(rows) else 0
        t0 = time.perf_counter()
        model.train()
        opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
        idx_all = torch.from_numpy(rows)
        x_all, y_all = data.features[idx_all], data.labels[idx_all]
        loss_sum, seen = 0.0, 0
        for batch in stage_batches(len(rows), steps, cfg.batch_size, batch_seed, data.shard, stage):
            idx = torch.from_numpy(batch)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(batch)
            seen += len(batch)
        model.eval()
        _freeze(model)
        snap = S3TStage(
            order_index=order_index,
            order=order,
            stage=stage,
            block=block,
            adapter=name,
            lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            adapter_state={
                k: v.detach().clone() for k, v in adapter_parameters(model, name).items()
            },
            head_state={k: v.detach().clone() for k, v in head_parameters(model).items()},
            sample_ids=data.sample_ids[in_stage].copy(),
            metrics={
                "loss": loss_sum / seen if seen else float("nan"),
                "steps": float(steps),
                "train_rows": float(len(rows)),
                "seconds": time.perf_counter() - t0,
            },
        )
        yield snap, model


def model_for(
    backbone: nn.Module, order_snapshots: Sequence[S3TStage | None], prefix: int
) -> nn.Module:
    """The stage-``prefix`` model of an order: a copy of the backbone with the adapters of
    stages 1..prefix (active) and the head of stage ``prefix``; later stages' adapters are
    not even present. ``prefix=0`` is the backbone itself (public data only)."""
    if not 0 <= prefix <= len(order_snapshots):
        raise ValueError(f"prefix must be in 0..{len(order_snapshots)}, got {prefix}")
    model = _freeze(copy.deepcopy(backbone))
    names = []
    for i, snap in enumerate(order_snapshots[:prefix], start=1):
        if snap is None:
            raise ValueError(f"stage {i} was retired (trained on deleted data): it cannot serve")
        if snap.stage != i:
            raise ValueError(f"snapshot {i - 1} is of stage {snap.stage}; stages must be 1..L")
        _inject(model, snap.adapter, snap.block, snap.lora_rank, snap.lora_alpha, 0)
        names.append(snap.adapter)
        params = adapter_parameters(model, snap.adapter)
        if params.keys() != snap.adapter_state.keys():
            raise ValueError(
                f"snapshot of {snap.adapter} does not fit the model: "
                f"{sorted(snap.adapter_state)} vs {sorted(params)}"
            )
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(snap.adapter_state[k])
    _activate(model, names)
    if prefix:
        head = head_parameters(model)
        state = order_snapshots[prefix - 1].head_state  # type: ignore[union-attr]
        if head.keys() != state.keys():
            raise ValueError(f"head snapshot keys {sorted(state)} do not fit {sorted(head)}")
        with torch.no_grad():
            for k, p in head.items():
                p.copy_(state[k])
    model.eval()
    return _freeze(model)


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
            orders = select_orders(cfg.selection, len(blocks), cfg.budget, cfg.deletion_prior)
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
        run.model, ctx.feature_shape, ctx.num_classes, public, cfg, run.seed
    )
    orders = select_orders(cfg.selection, len(blocks), cfg.budget, cfg.deletion_prior)
    out = {}
    for k in range(run.partition.shards) if shards is None else shards:
        data = ctx.shard_data(k, exclude=public_ids)
        out[k] = S3TShard.train(backbone, data, cfg, seed=run.seed, blocks=blocks, orders=orders)
    return S3TSystem(cfg, backbone, blocks, np.sort(public_ids), out, time.perf_counter() - t0)
