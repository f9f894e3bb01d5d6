"""Unlearning strategies. Importing this package registers the built-in ones."""

from ray_unlearn.platform.strategies import hybrid as _hybrid  # noqa: F401  (dpus, hs, ohs)
from ray_unlearn.platform.strategies import rum as _rum  # noqa: F401  (rum)
from ray_unlearn.platform.strategies import sisa as _sisa  # noqa: F401  (registers "sisa")
from ray_unlearn.platform.strategies.base import (
    ShardState,
    ShardUpdate,
    UnlearningStrategy,
    available_strategies,
    get_strategy,
    register_strategy,
)

__all__ = [
    "ShardState",
    "ShardUpdate",
    "UnlearningStrategy",
    "available_strategies",
    "get_strategy",
    "register_strategy",
]
