"""Unlearning strategies. Importing this package registers the built-in ones."""

from ray_unlearn.platform.methods import sisa as _sisa  # noqa: F401  (registers "sisa")
from ray_unlearn.platform.methods.base import (
    ShardState,
    ShardUpdate,
    UnlearningStrategy,
    available_strategies,
    get_strategy,
    register_strategy,
)
from ray_unlearn.platform.methods.hybrid import strategy as _hybrid  # noqa: F401  (dpus, hs, ohs)
from ray_unlearn.platform.methods.rum import strategy as _rum  # noqa: F401  (rum)

__all__ = [
    "ShardState",
    "ShardUpdate",
    "UnlearningStrategy",
    "available_strategies",
    "get_strategy",
    "register_strategy",
]
