"""The method registry: what core, the CLI and the Ray layers ask instead of naming a method.

A method is one :class:`Method` value registered once (``register``) by its package, which
``ray_unlearn.platform.methods`` imports: adding a method is one package plus one import line
there, with no edit in core, the CLI or the config. A method declares

* the names ``unlearning.strategy`` accepts for it: the SISA-family
  :class:`~ray_unlearn.platform.methods.base.UnlearningStrategy` classes it brings
  (``strategies``: they run in core's shard runtime), or ``kinds``: names that make a run this
  method's own kind, trained by its ``train`` hook and held by its ``runtime`` factory;
* its config sections (``sections``: a top-level YAML key and the pydantic class that
  validates it), which core's ``RunConfig`` is assembled from, plus cross-section checks;
* hooks, each defaulting to "nothing". Run-scoped hooks (``runtime``, ``undeletable``,
  ``restore_plan``, ``chain_exact``, ``serving_model``, ``background_restore``,
  ``sweep_problems``, ``ray_train_job``) are asked of the run's own method only (the one owning
  its ``unlearning.strategy``); ``config_problems``, ``train``, ``shard_hook`` and
  ``check_request`` of every
  method, since they read sections any run may set (``hybrid.record`` on a SISA run).

A new method, say ``methods/mine/``: ``config.py`` with its section's pydantic class,
``strategy.py`` with an ``UnlearningStrategy`` subclass, and in ``__init__.py``::

    register(Method("mine", strategies=(MyStrategy,), sections=(Section("mine", MineConfig),)))

plus the line ``from ray_unlearn.platform.methods import mine`` in ``methods/__init__.py``.
A run then takes ``unlearning.strategy: my-strategy`` and a top-level ``mine:`` section.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ray_unlearn.platform.methods.base import StrategyRef, UnlearningStrategy, register_strategy

if TYPE_CHECKING:  # numpy and torch stay out of config validation (imported where used)
    import numpy as np
    from torch import nn

    from ray_unlearn.platform.core.run import RunContext
    from ray_unlearn.platform.core.versions import ShardEntry


@dataclass(frozen=True)
class Section:
    """A top-level config key owned by a method (``hybrid:``) and the class validating it.

    ``optional``: the key defaults to null (the method's defaults apply when it is used)
    instead of a default instance."""

    key: str
    model: type[BaseModel]
    description: str = ""
    optional: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    description: str = ""
    # classes, or StrategyRef (imported on first use: a config is validated without them)
    strategies: tuple[type[UnlearningStrategy] | StrategyRef, ...] = ()
    # names that make a run this method's own kind (not UnlearningStrategy classes)
    kinds: tuple[str, ...] = ()
    # (label, what its deletions are): messages when a request's strategy does not fit a run
    # of this kind, e.g. ("S3T", "whose deletions are deactivations")
    kind_label: tuple[str, str] | None = None
    kind_exact: bool = True  # what `ray-unlearn strategies` shows for a kind
    kind_description: str = ""
    sections: tuple[Section, ...] = ()
    # keys of its sections that runs of other methods read too (hybrid: record and dtype,
    # read by its recording hook on any run); the others act only on this method's runs,
    # so a sweep counts two trials differing only there as one (tune/dedupe.py)
    shared_keys: tuple[str, ...] = ()
    # (run config) -> problems ("key: what is wrong"); collected into the config's error
    config_problems: Callable[[Any], list[str]] | None = None
    # (ctx) -> the training summary, or None when this method does not train this run
    train: Callable[[RunContext], dict[str, Any] | None] | None = None
    # (ctx, shard, generation) -> a hook on that shard's SISA training of versions of that
    # generation (core/training.py's ShardHook: hybrid records every step's contribution),
    # or None; asked of every method
    shard_hook: Callable[[RunContext, int, int], Any] | None = None
    # (ctx, strategy name, owner id | None, sample ids | None) -> None; raises ValueError to
    # refuse a request before it is logged (the run config already accepted the strategy)
    check_request: Callable[[RunContext, str, str | None, Any], None] | None = None
    # run-scoped hooks (the run's own method only):
    runtime: Callable[[RunContext, int, Any], Any] | None = None  # (ctx, shard, deleted)
    # (ctx) -> (sample ids no request may delete, "the ... declared not subject to deletion")
    undeletable: Callable[[RunContext], tuple[np.ndarray, str]] | None = None
    # (ctx, shard results of an execution, predict_proba of the backend) -> restore plan
    # {"shards", "depth", "triggered_by_accuracy", "accuracy"} or None
    restore_plan: Callable[[RunContext, dict[int, dict[str, Any]], Callable], Any] | None = None
    # (run config, a fresh model built from it) -> None; raises ValueError naming every
    # assumption of the method the model breaks (S3T: a head and a block list), at run
    # creation, before anything is stored
    check_model: Callable[[Any, nn.Module], None] | None = None
    # (ctx, registry entry) -> per chain version: is its snapshot exact?
    chain_exact: Callable[[RunContext, ShardEntry], list[bool]] | None = None
    # (ctx, version id) -> the model that version serves
    serving_model: Callable[[RunContext, str], nn.Module] | None = None
    # (run config) -> should a long-lived executor run restores in the background?
    background_restore: Callable[[Any], bool] | None = None
    # (run config, the sweep stream's validation fraction) -> problems of a sweep trial
    sweep_problems: Callable[[Any, float], list[str]] | None = None
    # dotted module of the Ray Train job for a run of this kind: it defines
    # ``prepare(ctx)``, ``loop(config)`` and ``ingest(ctx, result) -> seconds``
    ray_train_job: str | None = None

    def names(self) -> list[str]:
        return [s.name for s in self.strategies] + list(self.kinds)


_METHODS: dict[str, Method] = {}
_generation = 0  # bumped on every change: the assembled RunConfig model is cached by it


def register(method: Method) -> Method:
    """Register ``method`` (and its strategies). Refuses a name, kind or section key another
    method already owns; registering the same value twice is a no-op."""
    global _generation
    if _METHODS.get(method.name) == method:
        return method
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    owned = {n: m.name for m in _METHODS.values() for n in m.names()}
    keys = {s.key: m.name for m in _METHODS.values() for s in m.sections}
    for n in method.names():
        if n in owned:
            raise ValueError(
                f"strategy name {n!r} of method {method.name!r} is owned by {owned[n]!r}"
            )
    for s in method.sections:
        if s.key in keys:
            raise ValueError(
                f"config section {s.key!r} of method {method.name!r} is owned by {keys[s.key]!r}"
            )
    for cls in method.strategies:
        register_strategy(cls)
    _METHODS[method.name] = method
    _generation += 1
    return method


def unregister(name: str) -> None:
    """Remove a method (tests register toy ones); its strategies leave the strategy registry."""
    global _generation
    from ray_unlearn.platform.methods import base

    method = _METHODS.pop(name)
    for cls in method.strategies:
        base._REGISTRY.pop(cls.name, None)
    _generation += 1


def generation() -> int:
    return _generation


def methods() -> list[Method]:
    return list(_METHODS.values())


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(_METHODS)}") from None


def strategy_names() -> list[str]:
    """What ``unlearning.strategy`` accepts: the registered strategies (sorted), then the kinds."""
    from ray_unlearn.platform.methods.base import available_strategies

    return [*available_strategies(), *(k for m in _METHODS.values() for k in m.kinds)]


def method_of(strategy: str) -> Method | None:
    """The method owning a strategy name, or None for an unknown name."""
    for m in _METHODS.values():
        if strategy in m.names():
            return m
    return None


def run_method(config) -> Method | None:
    """The method owning the run's ``unlearning.strategy``."""
    return method_of(config.unlearning.strategy)


def _run_hook(config, hook: str):
    m = run_method(config)
    return None if m is None else getattr(m, hook)


def config_sections() -> list[Section]:
    return [s for m in _METHODS.values() for s in m.sections]


def config_problems(config) -> list[str]:
    """Every registered method's cross-section problems of a run config (before the config
    exists as a whole: called from its validator)."""
    out: list[str] = []
    for m in _METHODS.values():
        if m.config_problems is not None:
            out += m.config_problems(config)
    return out


# -- what core asks --------------------------------------------------------------------------
def own_runtime(ctx: RunContext, shard: int, deleted=()):
    """The run's method's shard runtime, or None (core's SISA runtime serves the run)."""
    factory = _run_hook(ctx.config, "runtime")
    return None if factory is None else factory(ctx, shard, deleted)


def train_run(ctx: RunContext) -> dict[str, Any] | None:
    """Train the run with a method's own training, or None when core's plain SISA training
    applies. The run's own method is asked first, then the others in registration order."""
    own = run_method(ctx.config)
    for m in [own, *(m for m in _METHODS.values() if m is not own)]:
        if m is not None and m.train is not None:
            out = m.train(ctx)
            if out is not None:
                return out
    return None


def shard_hook(ctx: RunContext, shard: int, generation: int = 0):
    """The hook a method adds to ``shard``'s SISA training of versions of ``generation``
    (training in process, on Ray Train workers, and exact retraining alike), or None. The
    first method that gives one wins (one hook per shard)."""
    for m in _METHODS.values():
        if m.shard_hook is not None:
            hook = m.shard_hook(ctx, shard, generation)
            if hook is not None:
                return hook
    return None


def refuse_undeletable(ctx: RunContext, ids: np.ndarray) -> np.ndarray:
    """``ids`` unchanged, or ValueError when some may not be deleted in this run."""
    import numpy as np

    hook = _run_hook(ctx.config, "undeletable")
    if hook is None:
        return ids
    protected, why = hook(ctx)
    hit = ids[np.isin(ids, protected)]
    if len(hit):
        raise ValueError(
            f"sample ids {hit[:5].tolist()} are in {why}; forgetting them needs a new run"
        )
    return ids


def undeletable_ids(ctx: RunContext) -> np.ndarray:
    """Sample ids no request may delete in this run (empty for most methods)."""
    import numpy as np

    hook = _run_hook(ctx.config, "undeletable")
    return np.empty(0, dtype=np.int64) if hook is None else hook(ctx)[0]


def restore_plan(ctx: RunContext, results: dict[int, dict[str, Any]], predict_proba):
    """Shards to retrain after an execution (and why), or None."""
    hook = _run_hook(ctx.config, "restore_plan")
    return None if hook is None or not results else hook(ctx, results, predict_proba)


def check_model(config, model) -> None:
    """The run's method's checks of the model it will train (ValueError), if it has any."""
    hook = _run_hook(config, "check_model")
    if hook is not None:
        hook(config, model)


def chain_exact(ctx: RunContext, entry: ShardEntry) -> list[bool] | None:
    """The run's method's judgement of a live chain's exactness, or None (core's rule)."""
    hook = _run_hook(ctx.config, "chain_exact")
    return None if hook is None else hook(ctx, entry)


def serving_model(ctx: RunContext, vid: str):
    """The model a version serves when the run's method builds it itself, else None."""
    hook = _run_hook(ctx.config, "serving_model")
    return None if hook is None else hook(ctx, vid)


def background_restore(config) -> bool:
    hook = _run_hook(config, "background_restore")
    return bool(hook is not None and hook(config))


def sweep_problems(config, validation_fraction: float) -> list[str]:
    hook = _run_hook(config, "sweep_problems")
    return [] if hook is None else hook(config, validation_fraction)


def ray_train_job(config) -> str | None:
    return _run_hook(config, "ray_train_job")


def listing() -> list[dict[str, Any]]:
    """``ray-unlearn strategies``: every name ``unlearning.strategy`` accepts."""
    from ray_unlearn.platform.methods.base import available_strategies, get_strategy

    rows = [
        {"name": n, "exact": get_strategy(n).exact, "description": get_strategy(n).description}
        for n in available_strategies()
    ]
    for m in _METHODS.values():
        rows += [
            {"name": k, "exact": m.kind_exact, "description": m.kind_description} for k in m.kinds
        ]
    return rows


def check_request(ctx: RunContext, name: str | None, owner: str | None = None, ids=None) -> None:
    """Refuse (ValueError) an execution strategy ``name`` that does not fit the run, before
    the request is logged: a run of a method's own kind takes only that kind; the run's
    config must accept the strategy (its sections' checks); then each method's own checks
    (DPUS: every version it would correct has recorded contributions). ``None``: the run's
    own strategy, nothing to check."""
    if name is None:
        return
    from ray_unlearn.platform.core.config import run_config_model

    run_m, req_m = run_method(ctx.config), method_of(name)
    if run_m is not None and run_m.kinds and name not in run_m.kinds:
        label, effect = run_m.kind_label or (run_m.name, "a run kind of its own")
        only = ", ".join(repr(k) for k in run_m.kinds)
        raise ValueError(
            f"--strategy {name!r}: run {ctx.run_id} is an {label} run, {effect}: only {only} applies"
        )
    if req_m is not None and name in req_m.kinds and req_m is not run_m:
        label = (req_m.kind_label or (req_m.name, ""))[0]
        raise ValueError(
            f"--strategy {name!r}: run {ctx.run_id} was not trained with {label}: "
            f"{name!r} does not apply"
        )
    doc = ctx.config.model_dump()
    doc["unlearning"]["strategy"] = name
    try:
        run_config_model().model_validate(doc)
    except ValueError as e:
        raise ValueError(f"--strategy {name!r} does not fit run {ctx.run_id}: {e}") from None
    for m in _METHODS.values():
        if m.check_request is not None:
            m.check_request(ctx, name, owner, ids)
