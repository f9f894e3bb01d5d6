"""RUM: memorization-aware approximate unlearning and its memorization scores."""

from __future__ import annotations

from ray_unlearn.platform.methods.base import StrategyRef
from ray_unlearn.platform.methods.registry import Method, Section, register
from ray_unlearn.platform.methods.rum.config import RumConfig

METHOD = register(
    Method(
        "rum",
        description="approximate: memorization-aware RUM (optionally routing memorized samples "
        "to exact)",
        # by reference: the strategy module imports torch, which validating a config does not need
        strategies=(StrategyRef("rum", "ray_unlearn.platform.methods.rum.strategy:RumStrategy"),),
        sections=(Section("rum", RumConfig),),
    )
)
