"""RUM: memorization-aware approximate unlearning and its memorization scores."""

from __future__ import annotations

from ray_unlearn.platform.methods.registry import Method, Section, register
from ray_unlearn.platform.methods.rum.config import RumConfig
from ray_unlearn.platform.methods.rum.strategy import RumStrategy

METHOD = register(
    Method(
        "rum",
        description=RumStrategy.description,
        strategies=(RumStrategy,),
        sections=(Section("rum", RumConfig),),
    )
)
