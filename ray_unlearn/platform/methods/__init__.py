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


def _load_installed_plugins() -> None:
    """Methods of other installed packages: each entry point of the group
    ``ray_unlearn.methods`` names a module whose import registers its method(s), e.g. in the
    plug-in's pyproject.toml ``[project.entry-points."ray_unlearn.methods"] mine =
    "my_package.unlearning"``. A plug-in that fails to import is an error naming it."""
    from importlib import import_module
    from importlib.metadata import entry_points

    for ep in entry_points(group="ray_unlearn.methods"):
        try:
            import_module(ep.value.split(":", 1)[0])
        except Exception as e:  # noqa: BLE001  (any failure: say which plug-in)
            raise ImportError(
                f"unlearning method plug-in {ep.name!r} ({ep.value}) failed to load: {e}"
            ) from e


_load_installed_plugins()

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
