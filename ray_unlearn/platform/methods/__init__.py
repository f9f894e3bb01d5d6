"""Unlearning methods as plug-ins behind one registry (:mod:`.registry`).

Importing this package registers the built-in methods: each line below imports one method
package, whose ``__init__`` calls :func:`register` once. Adding a method is one package and
one line here; core, the CLI and the config ask the registry and never name a method.
"""

from ray_unlearn.platform.methods.base import (
    ShardState,
    ShardUpdate,
    UnlearningStrategy,
    available_strategies,
    get_strategy,
    register_strategy,
)
from ray_unlearn.platform.methods.registry import (
    Method,
    Section,
    check_request,
    get_method,
    methods,
    register,
    strategy_names,
    unregister,
)

# -- built-in methods: each line imports one package, whose __init__ registers it ---------------
# isort: off
from ray_unlearn.platform.methods import sisa  # noqa: E402, F401  (sisa)
from ray_unlearn.platform.methods import hybrid  # noqa: E402, F401  (dpus, hs, ohs; hybrid:)
from ray_unlearn.platform.methods import rum  # noqa: E402, F401  (rum; rum:)
from ray_unlearn.platform.methods import s3t  # noqa: E402, F401  (s3t, a run kind; s3t:)
# isort: on

__all__ = [
    "Method",
    "Section",
    "ShardState",
    "ShardUpdate",
    "UnlearningStrategy",
    "available_strategies",
    "check_request",
    "get_method",
    "get_strategy",
    "methods",
    "register",
    "register_strategy",
    "strategy_names",
    "unregister",
]
