"""S3T's adapters: which blocks LoRA attaches to, injecting and activating adapters, the
parameters a stage trains, and the stage-p model rebuilt from snapshots.

Blocks and head are named by config (``model.parts``, ``s3t.block_names``; see
:mod:`ray_unlearn.platform.core.models`): the built-ins' defaults are the hidden Linear /
conv layers of ``body`` and the module ``head``; a user component names its blocks.

Adapters. One peft adapter per (order, stage), named ``s3t_o{order}_s{stage}``, injected
just before its stage with ``inject_adapter_in_model`` and targeting exactly one block
(``target_modules`` is a regex that must *fully* match the module name, so ``body.1``
never matches ``body.10``). An order's model therefore holds adapters only for the stages
trained so far; each adapted layer holds exactly one adapter, and all of them are active.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ray_unlearn.platform.core.models import ADAPTABLE, head_parameter_names, parts_of
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


def check_s3t(cfg: S3TConfig, model: nn.Module, num_slices: int) -> list[str]:
    """Validate ``cfg`` against a (fresh, un-adapted) model and the partition's R slices.

    Returns the block names (bottom to top). Raises :class:`S3TConfigError` listing every
    problem. Names match exactly: ``body.1`` is not ``body.10``.
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
                f"adaptable modules: {', '.join(adaptable) or 'none'}"
            )
        elif not isinstance(modules[name], ADAPTABLE):
            problems.append(
                f"block_names: {name!r} is a {type(modules[name]).__name__}; LoRA blocks must be "
                f"Linear or Conv2d (adaptable: {', '.join(adaptable)})"
            )
        elif name == head_name or name.startswith(head_name + "."):
            problems.append(f"block_names: {name!r} is in the head, which every stage trains fully")
    if not blocks:
        problems.append(
            "no block list: S3T adapts one named block per slice, bottom to top, and the "
            "model names none; name them in model.parts.blocks (or s3t.block_names), "
            f"from its Linear/Conv2d modules: {', '.join(adaptable) or 'none'}"
        )
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
    """Parameters of the head (``model.parts.head``; ``head`` for the built-ins)."""
    names = set(head_parameter_names(model))
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

    def tensors(self) -> StateDict:
        """All weights of the snapshot, flat (for safetensors)."""
        return {**self.adapter_state, **self.head_state}


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
