"""S3T's adapters: which blocks LoRA attaches to, how the R stages of an order map to
them, the one shared base model with named adapters, and the stage-p model.

Blocks and head are named by config (``model.parts``, ``s3t.block_names``; see
:mod:`ray_unlearn.platform.core.models`): the built-ins' defaults are the hidden Linear /
conv layers of ``body`` (``hf_encoder``: the encoder's transformer layers) and the module
``head``; a user component names its blocks.

Blocks and slices. ``s3t.num_blocks`` (default: all the blocks) and ``partition.slices``
R are independent. An order has R stages, one per slice; the top ``num_blocks`` blocks are
cut, top down, into R contiguous groups whose sizes differ by at most one (the larger
groups on top), and stage i adapts group i: so stage i's model holds adapters on the top
blocks of groups 1..i. ``num_blocks < R`` is refused (a stage would have no block).

Targets. A block that is a Linear / Conv2d is adapted itself; any other block (a
transformer layer) has its Linear layers named in ``s3t.lora_targets`` adapted (the
attention's query and value projections).

One shared base per process. The frozen backbone is never copied: each stage's adapter
is a named peft adapter slot ``s3t_o{order}_s{stage}`` injected once into the shared
backbone (``inject_adapter_in_model``; ``target_modules`` is a regex that must *fully*
match module names, so ``body.1`` never matches ``body.10``), whose own weights there stay
placeholders (B = 0: the backbone alone computes what it did before). A stage-p model is
a :class:`StageModel`: the names of its active adapters plus its own tensors (the
adapters' and the head's weights), run as ``torch.func.functional_call`` on the shared
backbone after ``set_adapter`` of exactly those names. Shards and orders in one process
(trainers, shard actors, serving caches) hold only adapters and heads; a lock per backbone
makes (activate, forward) atomic, since both change the shared module for the call.
"""

from __future__ import annotations

import math
import re
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ray_unlearn.platform.core.device import module_device
from ray_unlearn.platform.core.models import (
    ADAPTABLE,
    has_adaptable,
    head_parameter_names,
    parts_of,
)
from ray_unlearn.platform.core.training import StateDict
from ray_unlearn.platform.methods.s3t.config import S3TConfig
from ray_unlearn.platform.methods.s3t.orders import Order


class S3TConfigError(ValueError):
    """An S3T config that does not fit the model or the partition; lists every problem."""


# -- blocks and validation ---------------------------------------------------------------


def default_block_names(model: nn.Module) -> list[str]:
    """The model's LoRA blocks when ``s3t.block_names`` names none, bottom to top: those
    of ``model.parts.blocks``, else the built-ins' Linear / Conv2d layers of ``model.body``
    (MLP: ``body.0, body.2, ...``; SmallCNN: its conv layers); [] when neither names any
    (a user component must name its blocks)."""
    return list(parts_of(model).blocks or [])


def block_targets(model: nn.Module, block: str, lora_targets: Sequence[str]) -> list[str]:
    """The modules LoRA wraps for ``block``: the block itself when it is Linear / Conv2d,
    else its Linear layers whose last name component is in ``lora_targets``."""
    module, wrapped = model.get_submodule(block), _tuner_layer()  # already wrapped: counts
    if isinstance(module, (*ADAPTABLE, wrapped)):
        return [block]
    wanted = set(lora_targets)
    return [
        f"{block}.{n}"
        for n, m in module.named_modules()
        if n and isinstance(m, (nn.Linear, wrapped)) and n.rsplit(".", 1)[-1] in wanted
    ]


def stage_groups(blocks: Sequence[str], num_slices: int) -> list[list[str]]:
    """Blocks of each stage, ``[stage 1, ..., stage R]``: ``blocks`` (bottom to top) cut top
    down into R contiguous groups whose sizes differ by at most one, larger groups on top
    (L=6, R=4: [5, 4], [3, 2], [1], [0] by position). L = R: one block per stage."""
    L, R = len(blocks), num_slices
    if R < 1 or L < R:
        raise S3TConfigError(
            f"S3T needs at least one block per stage: {L} block(s) for R={R} slices"
        )
    top_down = list(reversed(blocks))
    sizes = [L // R + (1 if i < L % R else 0) for i in range(R)]
    ends = np.cumsum(sizes).tolist()
    return [top_down[e - n : e] for n, e in zip(sizes, ends, strict=True)]


def check_s3t(cfg: S3TConfig, model: nn.Module, num_slices: int) -> list[str]:
    """Validate ``cfg`` against a (fresh, un-adapted) model and the partition's R slices.

    Returns the adapted block names (bottom to top: the top ``num_blocks`` of them).
    Raises :class:`S3TConfigError` listing every problem. Names match exactly: ``body.1``
    is not ``body.10``.
    """
    problems: list[str] = []
    modules = dict(model.named_modules())
    head_name = parts_of(model).head
    head = modules.get(head_name)
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        problems.append(
            f"the model needs a trainable head module (one copy per order): {head_name!r} "
            "(model.parts.head) is not one"
        )
    blocks = list(cfg.block_names) if cfg.block_names is not None else default_block_names(model)
    adaptable = [n for n, m in modules.items() if isinstance(m, ADAPTABLE) and n]
    for name in blocks:
        if name not in modules:
            problems.append(
                f"block_names: {name!r} is not a module of the model (exact names); "
                f"adaptable modules: {', '.join(adaptable[:40]) or 'none'}"
            )
        elif not has_adaptable(modules[name]):
            problems.append(
                f"block_names: {name!r} is a {type(modules[name]).__name__}; LoRA blocks must be "
                f"Linear or Conv2d or hold such layers (adaptable: {', '.join(adaptable[:40])})"
            )
        elif name == head_name or name.startswith(head_name + "."):
            problems.append(f"block_names: {name!r} is in the head, which every stage trains fully")
        elif not block_targets(model, name, cfg.lora_targets):
            inner = [n for n, m in modules[name].named_modules() if n and isinstance(m, nn.Linear)]
            problems.append(
                f"block {name!r} has no Linear layer named one of s3t.lora_targets "
                f"{list(cfg.lora_targets)}; its Linear layers: {', '.join(inner) or 'none'}"
            )
    R = num_slices
    if not blocks:
        problems.append(
            "no block list: S3T adapts named blocks, one group per slice, top down, and the "
            "model names none; name them in model.parts.blocks (or s3t.block_names), "
            f"from its Linear/Conv2d modules or layers holding them: {', '.join(adaptable[:40]) or 'none'}"
        )
    elif cfg.num_blocks is not None and cfg.num_blocks > len(blocks):
        problems.append(
            f"num_blocks: {cfg.num_blocks} exceeds the model's {len(blocks)} blocks "
            f"({', '.join(blocks)}); use 1..{len(blocks)} (or null for all)"
        )
    else:
        if cfg.num_blocks is not None:
            blocks = blocks[len(blocks) - cfg.num_blocks :]
        if len(blocks) < R:
            problems.append(
                f"every stage adapts at least one block of its own: L = {len(blocks)} block(s) "
                f"({', '.join(blocks)}) is fewer than the R = {R} slices (stages); set "
                f"partition.slices <= {len(blocks)}, or adapt more blocks (s3t.num_blocks, "
                "s3t.block_names)"
            )
    if R >= 1 and cfg.budget > math.factorial(R):
        problems.append(
            f"budget: B={cfg.budget} exceeds the {math.factorial(R)} distinct orders of "
            f"R={R} slices; use budget <= {math.factorial(R)}"
        )
    if cfg.retrain_depth_threshold > R:
        problems.append(
            f"retrain_depth_threshold: {cfg.retrain_depth_threshold} exceeds the depth R={R}; "
            f"use 1..{R}"
        )
    if cfg.deletion_prior is not None and len(cfg.deletion_prior) != R:
        problems.append(
            f"deletion_prior: one probability per slice is needed (R={R}), "
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
    model: nn.Module,
    name: str,
    targets: str | Sequence[str],
    rank: int,
    alpha: float,
    init_seed: int,
) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    targets = [targets] if isinstance(targets, str) else list(targets)  # one module, or several
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=_exact(targets),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,  # A: seeded Kaiming-uniform, B: zeros (a no-op until trained)
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # one adapter per stage is the design, not an accident
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        torch.manual_seed(init_seed)
        inject_adapter_in_model(cfg, model, adapter_name=name)
    modules = dict(model.named_modules())
    for t in targets:
        layer = modules.get(t)
        if not isinstance(layer, _tuner_layer()) or name not in getattr(layer, "lora_A", {}):
            raise RuntimeError(f"adapter {name} was not injected into {t!r}")


def _activate(model: nn.Module, names: Sequence[str]) -> None:
    """Make exactly ``names`` active in every adapted layer (those of them it holds); no
    gradients on the slots. Layers already in that state are left alone."""
    tuner_layer = _tuner_layer()
    for m in model.modules():
        if isinstance(m, tuner_layer):
            want = [n for n in names if n in m.lora_A]
            if list(m.active_adapters) != want:
                m.set_adapter(want, inference_mode=True)


_LOCKS_GUARD = threading.Lock()
# backbone -> its lock; kept outside the module so that copying or pickling it still works
_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()


def base_lock(base: nn.Module) -> threading.RLock:
    """The lock of a shared backbone: held while a :class:`StageModel` activates its
    adapters and runs (both change the shared module for the duration of the call)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(base)
        if lock is None:
            lock = _LOCKS[base] = threading.RLock()
    return lock


def slot_parameters(base: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The placeholder parameters of adapter slot ``name`` in the shared backbone."""
    return {n: p for n, p in base.named_parameters() if name in n.split(".")}


def _slot_fits(have: dict[str, nn.Parameter], targets: Sequence[str], rank: int) -> bool:
    layers = sorted({n.split(".lora_")[0] for n in have})
    ranks = {p.shape[0] for n, p in have.items() if ".lora_A." in n}
    return layers == sorted(targets) and ranks == {rank}


def ensure_slot(
    base: nn.Module, name: str, targets: Sequence[str], rank: int, alpha: float
) -> tuple[str, dict[str, nn.Parameter]]:
    """The slot of adapter ``name`` in the shared ``base``, injected at ``targets`` unless
    there; its weights in the base stay placeholders (B = 0, so they change nothing even
    when active). Returns (slot name, its parameters). The slot is ``name`` itself, unless
    that slot is already taken with other targets or another rank (the same backbone used
    with another block layout): then ``name`` plus a digest of the layout."""
    import hashlib

    with base_lock(base):
        layout = hashlib.sha256(repr((sorted(targets), rank, alpha)).encode()).hexdigest()[:8]
        for slot in (name, f"{name}_{layout}"):
            have = slot_parameters(base, slot)
            if have and _slot_fits(have, targets, rank):
                return slot, have
            if not have:
                _inject(base, slot, targets, rank, alpha, 0)
                _activate(base, [])
                for p in base.parameters():
                    p.requires_grad_(False)
                with torch.no_grad():
                    for n, p in slot_parameters(base, slot).items():
                        if ".lora_B." in n:
                            p.zero_()
                return slot, slot_parameters(base, slot)
    raise ValueError(f"adapter slot {name}_{layout} does not fit {sorted(targets)}, rank {rank}")


def renamed(state: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    """``state`` with adapter name component ``old`` replaced by ``new`` (same tensors)."""
    if old == new:
        return dict(state)
    return {".".join(new if c == old else c for c in k.split(".")): v for k, v in state.items()}


def init_adapter(slot: dict[str, nn.Parameter], seed: int) -> dict[str, torch.Tensor]:
    """Fresh weights of one adapter, a function of ``seed`` only: every A Kaiming-uniform
    (a = sqrt(5), as peft's default init), every B zero, drawn in parameter-name order.

    Drawn on the CPU generator and returned on the CPU whatever device the slot is on (the
    caller moves them), so an adapter starts from the same weights on every device."""
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for n in sorted(slot):
            t = torch.zeros(slot[n].shape, dtype=slot[n].dtype)
            if ".lora_B." not in n:
                nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            out[n] = t
    return out


def base_state(model: nn.Module) -> StateDict:
    """The backbone's own state, without adapter slots (peft renames a wrapped layer's
    weights ``<layer>.base_layer.*``; this gives back the original names)."""
    return {
        k.replace(".base_layer.", "."): v
        for k, v in model.state_dict().items()
        if ".lora_" not in k
    }


class StageModel(nn.Module):
    """One order's stage-p model over a shared backbone it does not own or copy.

    ``adapters``: the active adapter names (stages 1..p); ``tensors``: parameter name in
    the backbone -> this model's own tensor (those adapters' weights and its head), used in
    place of the backbone's for each call. Everything else is the backbone's, shared."""

    def __init__(self, base: nn.Module, adapters: Sequence[str], tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.__dict__["_base"] = base  # not a submodule: not copied, saved or moved with us
        self.adapters = list(adapters)
        self.tensors = dict(tensors)

    @property
    def base(self) -> nn.Module:
        return self.__dict__["_base"]

    def _apply(self, fn, recurse: bool = True):
        """``.to()`` / ``.cpu()`` / ``.cuda()`` act on this model's own tensors (the shared
        backbone is not ours to move: one base per process and device). Moving them off
        the backbone's device is refused: the forward would mix devices."""
        moved = {k: fn(t) for k, t in self.tensors.items()}
        base_dev = module_device(self.base)
        off = sorted({str(t.device) for t in moved.values()} - {str(base_dev)})
        if off:
            raise ValueError(
                f"an S3T stage model runs on its shared backbone's device ({base_dev}); it "
                f"cannot move to {', '.join(off)}: build it over a backbone on that device "
                "(load_backbone(ctx, device=...), load_serving_model(ctx, vid, device))"
            )
        self.tensors = moved
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        with base_lock(self.base):
            _activate(self.base, self.adapters)
            return functional_call(self.base, self.tensors, (x,), strict=False)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The parameters this model computes with: its own tensors where it has them,
        the shared backbone's elsewhere (names as in the backbone)."""
        for n, p in self.base.named_parameters():
            yield prefix + n, self.tensors.get(n, p)

    def own_parameters(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)


def _freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Parameters of adapter ``name``: those with ``name`` as an exact dotted component."""
    return {n: p for n, p in model.named_parameters() if name in n.split(".")}


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of the head (``model.parts.head``; ``head`` for the built-ins)."""
    names = set(head_parameter_names(model.base if isinstance(model, StageModel) else model))
    return {n: p for n, p in model.named_parameters() if n in names}


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
    head_state: StateDict  # the head's parameters: "head.weight", "head.bias", ...
    sample_ids: np.ndarray  # ids of slices order[:stage] it was trained on
    metrics: dict[str, float] = field(default_factory=dict)
    # the modules its adapter wraps (stored since blocks and slices became independent;
    # empty: the one module ``block``, as stages stored before are)
    targets: tuple[str, ...] = ()

    def wrapped(self) -> list[str]:
        return list(self.targets) or [self.block]

    def tensors(self) -> StateDict:
        """All weights of the snapshot, flat (for safetensors)."""
        return {**self.adapter_state, **self.head_state}


def model_for(
    backbone: nn.Module, order_snapshots: Sequence[S3TStage | None], prefix: int
) -> StageModel:
    """The stage-``prefix`` model of an order over the shared ``backbone`` (never copied):
    the adapters of stages 1..prefix active, with their snapshot weights, and the head of
    stage ``prefix``; later stages' adapters play no part. ``prefix=0`` is the backbone
    itself (public data only). It runs on the backbone's device: the snapshot tensors are
    moved there (used as they are, not copied, when they are already there, as on CPU)."""
    if not 0 <= prefix <= len(order_snapshots):
        raise ValueError(f"prefix must be in 0..{len(order_snapshots)}, got {prefix}")
    names: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    dev = module_device(backbone)  # snapshots are CPU tensors: moved to it (on CPU, no copy)
    for i, snap in enumerate(order_snapshots[:prefix], start=1):
        if snap is None:
            raise ValueError(f"stage {i} was retired (trained on deleted data): it cannot serve")
        if snap.stage != i:
            raise ValueError(f"snapshot {i - 1} is of stage {snap.stage}; stages must be 1..L")
        slot, params = ensure_slot(
            backbone, snap.adapter, snap.wrapped(), snap.lora_rank, snap.lora_alpha
        )
        state = renamed(snap.adapter_state, snap.adapter, slot)
        if params.keys() != state.keys():
            raise ValueError(
                f"snapshot of {snap.adapter} does not fit the model: "
                f"{sorted(snap.adapter_state)} vs {sorted(params)}"
            )
        names.append(slot)
        tensors.update({k: v.to(dev) for k, v in state.items()})
    if prefix:
        head = head_parameters(backbone)
        state = order_snapshots[prefix - 1].head_state  # type: ignore[union-attr]
        if head.keys() != state.keys():
            raise ValueError(f"head snapshot keys {sorted(state)} do not fit {sorted(head)}")
        tensors.update({k: v.to(dev) for k, v in state.items()})
    return StageModel(backbone, names, tensors).eval()
