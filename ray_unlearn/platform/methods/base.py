"""The unlearning-strategy interface and its registry.

A strategy turns "these samples of this shard are deleted" into new snapshots for the
shard's stages. A method brings its strategies in its :class:`~.registry.Method`
(``strategies=``), registered by its package (see :mod:`.registry`); runs pick one with
``unlearning.strategy``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # numpy too: validating a config imports this module, never numpy
    import numpy as np

    from ray_unlearn.platform.core.run import RunContext
    from ray_unlearn.platform.core.training import ShardData, StageResult, StateDict


@dataclass
class ShardState:
    """What a strategy sees of one shard: its rows before the deletion and its live chain."""

    data: ShardData  # rows still live before this deletion (earlier deletions removed)
    snapshots: list[StateDict]  # live snapshot per stage, stage 0..R-1
    chain: list[str]  # version id per stage
    # per stage: is the live snapshot exact (no approximate strategy in its lineage)?
    # None: read from the versions' manifests (snapshots held outside the store pass it)
    exact: list[bool] | None = None


@dataclass
class ShardUpdate:
    """A strategy's answer: stages ``first_stage..R-1`` replaced by ``stages``."""

    first_stage: int
    stages: list[StageResult]
    exact: bool  # True when the new snapshots equal training without the deleted samples
    # what the strategy decided and why (hybrid: prediction, decision, actual seconds); goes
    # into the deletion log's details of every request of the batch
    info: dict[str, Any] = field(default_factory=dict)


class UnlearningStrategy(ABC):
    name: ClassVar[str]
    exact: ClassVar[bool]
    description: ClassVar[str] = ""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    @abstractmethod
    def unlearn_shard(self, state: ShardState, deleted: np.ndarray) -> ShardUpdate:
        """Remove ``deleted`` (sample ids, all in this shard, at least one) from the shard."""


def affected_rows(state: ShardState, deleted: np.ndarray) -> tuple[np.ndarray, int]:
    """(mask of the shard's rows being deleted, first affected slice); raises if none is."""
    import numpy as np

    data = state.data
    in_shard = np.isin(data.sample_ids, np.asarray(deleted, dtype=np.int64))
    if not in_shard.any():
        raise ValueError(
            f"none of the deleted samples {np.asarray(deleted)[:5].tolist()} is live in "
            f"shard {data.shard}"
        )
    return in_shard, int(data.slices[in_shard].min())


@dataclass(frozen=True)
class StrategyRef:
    """A strategy registered by name before its module is imported: its class is imported on
    first use (:func:`get_strategy`). Validating a config only needs the names, so a method
    whose strategy module imports torch registers a ref and a bad config is reported without
    importing torch (seconds saved on every typo)."""

    name: str
    target: str  # "package.module:ClassName"

    def load(self) -> type[UnlearningStrategy]:
        import importlib

        module, _, attr = self.target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if getattr(cls, "name", None) != self.name:
            raise TypeError(
                f"{self.target} is named {getattr(cls, 'name', None)!r}, not {self.name!r}"
            )
        return cls


_REGISTRY: dict[str, type[UnlearningStrategy] | StrategyRef] = {}


def _target(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def register_strategy(
    cls: type[UnlearningStrategy] | StrategyRef,
) -> type[UnlearningStrategy] | StrategyRef:
    """Register a strategy class (a decorator) or a :class:`StrategyRef` to it. The class
    itself, registered when its module is imported, replaces its own ref."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls!r} needs a `name`")
    held = _REGISTRY.get(cls.name)
    same = (
        held is None
        or held is cls
        or held == cls
        or (
            isinstance(held, StrategyRef)
            and not isinstance(cls, StrategyRef)
            and held.target == _target(cls)
        )
        or (
            isinstance(cls, StrategyRef)
            and not isinstance(held, StrategyRef)
            and cls.target == _target(held)
        )
    )
    if not same:
        raise ValueError(f"strategy name {cls.name!r} is already registered by {held!r}")
    if not (isinstance(cls, StrategyRef) and held is not None):
        _REGISTRY[cls.name] = cls  # a ref never replaces its loaded class
    return cls


def available_strategies() -> list[str]:
    return sorted(_REGISTRY)


def get_strategy(name: str) -> type[UnlearningStrategy]:
    try:
        entry = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown unlearning strategy {name!r}; available: {', '.join(available_strategies())}"
        ) from None
    if isinstance(entry, StrategyRef):
        entry = _REGISTRY[name] = entry.load()
    return entry


def next_generation(chain: list[str]) -> int:
    """The generation a retrain of a shard whose live chain is ``chain`` writes (``-gNNNN``)."""
    return int(chain[-1].rsplit("-g", 1)[1]) + 1


def retrain_exact(
    ctx: RunContext, state: ShardState, deleted: np.ndarray, first: int, *, record: bool = True
) -> ShardUpdate:
    """SISA retraining of ``state``'s shard from slice ``first`` without ``deleted``: exact
    only when the snapshot it restarts from is (an approximate strategy may have made it).
    With ``record``, the hook a method adds to SISA training (the registry's
    ``shard_hook``: hybrid records contributions when ``hybrid.record``) sees the retraining
    too, so a later approximate update can correct the new versions."""
    from ray_unlearn.platform.core.training import train_shard
    from ray_unlearn.platform.core.versions import chain_exactness
    from ray_unlearn.platform.methods import registry

    cfg = ctx.config
    hook = None
    if record:
        hook = registry.shard_hook(ctx, state.data.shard, next_generation(state.chain))
    stages = train_shard(
        state.data.without(deleted),
        cfg.model,
        cfg.training,
        seed=cfg.seed,
        feature_shape=ctx.feature_shape,
        num_classes=ctx.num_classes,
        start_stage=first,
        start_state=state.snapshots[first - 1] if first > 0 else None,
        on_step=hook.on_step if hook is not None else None,
        on_stage=hook.on_stage if hook is not None else None,
    )
    if first == 0:
        parent_exact = True
    elif state.exact is not None:
        parent_exact = state.exact[first - 1]
    else:
        parent_exact = chain_exactness(ctx, state.chain[:first])[-1]
    for st in stages:
        st.metrics["exact"] = float(parent_exact)
    return ShardUpdate(first_stage=first, stages=stages, exact=parent_exact)
