"""The sweep file: what to vary, the deletion stream each trial runs, where results go.

A sweep YAML names a base run config and a search space over dotted run-config keys
(``partition.shards``, ``s3t.budget``, ``hybrid.threshold``, ...) plus one key that is not a
run setting, ``serving.policy`` (an ERASER preset, measured by the trial's serving pass)::

    name: digits-sweep
    base_config: digits.yaml            # relative to this file
    overrides: [training.epochs=10]     # applied to every trial
    search:
      method: grid                      # grid: every combination; random: num_samples draws
      space:
        partition.shards: [2, 4]
        serving.policy: [lazy-exclude, immediate-wait]
    stream: {deletions: 6, seed: 0, predictions: 100}
    ...

Dimensions that only make sense together go in ``search.variants``: each variant is its own
small space, crossed with the shared ``space``, and the grid is the union of the variants'
grids. So one sweep can weigh SISA against hybrid thresholds against S3T budgets::

    search:
      space: {partition.shards: [2, 4], serving.policy: [lazy-exclude]}
      variants:
        - {unlearning.strategy: [sisa], partition.slices: [2, 4]}
        - {unlearning.strategy: [hs], hybrid.record: [true], hybrid.threshold: [0.05, 0.3]}
        - {unlearning.strategy: [s3t], model.hidden: [[64, 64, 64]], s3t.budget: [1, 3]}

``ray-unlearn sweep --config F key=value ...`` overrides: keys of the sweep file
(``stream.deletions=3``, ``search.variants=[]`` to drop the variants), ``space.<run
key>=[...]`` to replace one dimension (in the variants that have it, else in the shared
space), and any other
dotted key is a run-config override for every trial (``training.epochs=5``). Every grid
point's run config is validated when the sweep is loaded, and every problem is reported at
once, before any trial starts.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from ray_unlearn.platform.core.config import (
    ConfigError,
    CoreRunConfig,
    load_config,
    parse_override_value,
    parse_overrides,
    run_config_model,
)
from ray_unlearn.platform.core.config_errors import Problem, Sources, collect, report
from ray_unlearn.platform.methods import registry
from ray_unlearn.platform.serving.policies import get_policy

POLICY_KEY = "serving.policy"
HIGHER_IS_BETTER = {"val_accuracy", "served_accuracy"}
Objective = Literal[
    "val_accuracy",
    "served_accuracy",
    "unlearn_cpu_s",
    "unlearn_s",
    "latency_mean_ms",
    "latency_p99_ms",
]


def _no_test_selection(value: Any) -> Any:
    """Refuse the objective names of earlier releases, which selected on test rows."""
    if value in ("accuracy", "test_accuracy"):
        raise ValueError(
            f"{value!r} is no longer an objective: the sweep selects on validation rows; use "
            "'val_accuracy' (test_accuracy is reported beside it and never selected on)"
        )
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchSpec(_Strict):
    method: Literal["grid", "random"] = Field(
        "grid", description="grid: every combination; random: num_samples random draws."
    )
    num_samples: int = Field(1, ge=1, description="random: trials drawn; grid: repeats.")
    space: dict[str, list[Any]] = Field(
        default_factory=dict, description="dotted run-config key (or serving.policy) -> values"
    )
    variants: list[dict[str, list[Any]]] = Field(
        default_factory=list,
        description="Alternative sub-spaces, each crossed with `space`; the grid is their union.",
    )

    @field_validator("space")
    @classmethod
    def _values(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, vals in v.items() if not vals]
        if empty:
            raise ValueError(f"every dimension needs at least one value; empty: {empty}")
        return v

    @model_validator(mode="after")
    def _variants(self) -> SearchSpec:
        problems = []
        for i, variant in enumerate(self.variants):
            if not variant:
                problems.append(f"variants[{i}] is empty (give it at least one dimension)")
            empty = [k for k, vals in variant.items() if not vals]
            if empty:
                problems.append(f"variants[{i}]: every dimension needs a value; empty: {empty}")
            both = sorted(set(variant) & set(self.space))
            if both:
                problems.append(
                    f"variants[{i}] repeats {both}, already in space: a key is either shared "
                    "(space) or per variant, not both"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class StreamSpec(_Strict):
    deletions: int = Field(6, ge=1, description="Owner deletions each trial executes.")
    seed: int = Field(0, ge=0, description="Seed of the owners drawn (same for every trial).")
    predictions: int = Field(
        100, ge=1, description="Validation instances answered at each deletion step."
    )
    validation_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Part of the held-out rows (seeded by sample id) every selection, ranking "
        "and early stop reads; the rest are test rows, only reported. Not below an S3T "
        "trial's s3t.validation_fraction (its accuracy trigger reads those rows).",
    )


class StopSpec(_Strict):
    min_accuracy: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Stop a trial as soon as its validation accuracy during the stream "
        "falls below this (a hopeless trial); None: never.",
    )
    asha: bool = Field(
        False,
        description="Also use Tune's ASHA scheduler on validation accuracy per deletion step "
        "(rungs at 1, 4, 16 ... deletions; below the best quarter at a rung stops). It ranks on "
        "accuracy alone, so it may drop cheap trials that would be on the front: for large random "
        "sweeps.",
    )


class MlflowSpec(_Strict):
    tracking_uri: str | None = Field(
        None,
        description="None: $MLFLOW_TRACKING_URI, else SQLite under the storage root "
        "(<root>/mlflow/mlflow.db, artifacts beside it).",
    )
    experiment: str = Field("ray-unlearn-sweeps")


class ParetoSpec(_Strict):
    """The three objectives of the Pareto front (accuracy up, cost and latency down)."""

    accuracy: Annotated[
        Literal["val_accuracy", "served_accuracy"], BeforeValidator(_no_test_selection)
    ] = Field(
        "val_accuracy",
        description="val_accuracy: the ensemble's validation accuracy after the stream; "
        "served_accuracy: accuracy of the answers the policy gave during it (validation "
        "instances too).",
    )
    cost: Literal["unlearn_cpu_s", "unlearn_s"] = Field(
        "unlearn_cpu_s",
        description="unlearn_cpu_s: CPU seconds spent executing the deletions (stable on a "
        "shared machine); unlearn_s: their wall seconds.",
    )
    latency: Literal["latency_mean_ms", "latency_p99_ms"] = "latency_mean_ms"
    allow_exposure: bool = Field(
        False,
        description="Let trials with exposure violations (answers from a model holding data "
        "of a submitted deletion: the naive-postponed baseline) onto the front; by default "
        "they are shown, never chosen.",
    )

    def objectives(self) -> dict[str, bool]:
        """metric -> True when larger is better."""
        return {self.accuracy: True, self.cost: False, self.latency: False}


class SelectSpec(_Strict):
    """Which Pareto-optimal configuration is written out as the chosen one."""

    metric: Annotated[Objective, BeforeValidator(_no_test_selection)] = "val_accuracy"
    mode: Literal["max", "min"] | None = Field(
        None, description="max for accuracies, min for costs and latencies (the default)."
    )

    @model_validator(mode="after")
    def _direction(self) -> SelectSpec:
        right = "max" if self.metric in HIGHER_IS_BETTER else "min"
        if self.mode is None:
            self.mode = right
        elif self.mode != right:
            raise ValueError(
                f"select.mode={self.mode!r} contradicts select.metric={self.metric!r}: "
                f"{self.metric} is best at its {right}imum (use mode: {right} or leave it out)"
            )
        return self


class SweepSpec(_Strict):
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    base_config: str = Field(..., description="Run config YAML (relative to the sweep file).")
    overrides: list[str] = Field(default_factory=list)
    search: SearchSpec = Field(default_factory=SearchSpec)
    stream: StreamSpec = Field(default_factory=StreamSpec)
    stop: StopSpec = Field(default_factory=StopSpec)
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    pareto: ParetoSpec = Field(default_factory=ParetoSpec)
    select: SelectSpec = Field(default_factory=SelectSpec)
    max_concurrent_trials: int = Field(
        1, ge=1, description="Trials at once; each trains in-process on 1 CPU."
    )
    keep_runs: bool = Field(
        False,
        description="Keep each trial's run (checkpoints, log) under the sweep directory; "
        "by default it is deleted once measured (the chosen config can be retrained).",
    )
    default_policy: str = Field(
        "lazy-exclude", description="ERASER preset when the space has no serving.policy."
    )

    # filled by load_sweep
    source: str = ""
    base: dict[str, Any] = Field(default_factory=dict, description="Base run config (resolved).")


def _split_overrides(
    overrides: list[str],
) -> tuple[dict[str, Any], list[str], dict[str, Any], list[str]]:
    """-> (sweep-file tree, run-config overrides, space replacements, the raw sweep-key
    overrides: what a problem of the sweep file's keys is blamed on)."""
    sweep_keys = set(SweepSpec.model_fields) - _FILLED
    sweep, run, space, raw = [], [], {}, []
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if key.startswith("space."):
            space[key.removeprefix("space.")] = parse_override_value(o, o.split("=", 1)[1])
        elif key.split(".", 1)[0] in sweep_keys:
            sweep.append(o)
            raw.append(o)
        else:
            run.append(o)
    return parse_overrides(sweep), run, space, raw


_FILLED = frozenset({"source", "base"})  # set by load_sweep, not keys of a sweep file


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read, override and validate a sweep file, and every trial's run config. ConfigError
    lists every problem at once: the sweep file's own keys, the base config, and each
    distinct problem of the grid's trials, each blamed on the file or the override."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {p} not found")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep file {p} is not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"sweep file {p} must hold a mapping, not {type(tree).__name__}")
    sweep_tree, run_overrides, space, raw = _split_overrides(overrides or [])
    # a dimension replaced on the command line: its problems are the override's
    by_dim = {
        o.split("=", 1)[0].strip().removeprefix("space."): o
        for o in overrides or []
        if o.split("=", 1)[0].strip().startswith("space.")
    }
    _merge(tree, sweep_tree)
    search = tree.setdefault("search", {})
    for k, v in space.items():
        values = v if isinstance(v, list) else [v]
        # a dimension is replaced where it is: in the variants that have it, else the space
        holders = [
            var for var in search.get("variants") or [] if isinstance(var, dict) and k in var
        ]
        for var in holders:
            var[k] = values
        if not holders:
            if not isinstance(search.get("space"), dict):
                search["space"] = {}
            search["space"][k] = values
    if run_overrides:
        tree["overrides"] = [*(tree.get("overrides") or []), *run_overrides]
    spec, problems = collect(SweepSpec, tree, Sources.of(f"in {p}", raw), hidden=_FILLED)
    base_overrides = tree.get("overrides") if isinstance(tree.get("overrides"), list) else []
    base_rel = tree.get("base_config") if spec is None else spec.base_config
    base = None
    if isinstance(base_rel, str):
        try:
            base = load_config((p.parent / base_rel).resolve(), [str(o) for o in base_overrides])
        except ConfigError as e:
            # (each problem already names the base file or the override that set it)
            problems += [Problem(**d) for d in e.problems] or [
                Problem("base_config", str(e), f"in {p}")
            ]
    if spec is not None and base is not None:
        # the grid's problems too (with a failing sweep key at its default): one report
        spec.source = str(p.resolve())
        spec.base = base.model_dump(mode="json")
        problems += check_trials(spec, by_dim)
    if problems or spec is None or base is None:
        raise report(f"invalid sweep {p}", problems)
    return spec


def _product(space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(space)
    return [
        dict(zip(keys, combo, strict=True))
        for combo in itertools.product(*(space[k] for k in keys))
    ]


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every point of the grid: the shared space crossed with each variant, in order."""
    variants = spec.search.variants or [{}]
    return [p for v in variants for p in _product({**spec.search.space, **v})]


def dimensions(spec: SweepSpec) -> dict[str, list[Any]]:
    """Every key the sweep varies -> the values it takes anywhere in the grid."""
    dims: dict[str, list[Any]] = {}
    for space in [spec.search.space, *spec.search.variants]:
        for k, vals in space.items():
            dims.setdefault(k, [])
            dims[k] += [v for v in vals if v not in dims[k]]
    return dims


def trial_config(
    spec: SweepSpec, params: dict[str, Any], storage: str | None = None
) -> CoreRunConfig:
    """The run config of one trial: base + the trial's values (serving.policy excluded)."""
    return run_config_model().model_validate(trial_tree(spec, params, storage))


def trial_tree(
    spec: SweepSpec, params: dict[str, Any], storage: str | None = None
) -> dict[str, Any]:
    """The run config tree of one trial, not validated."""
    tree = yaml.safe_load(yaml.safe_dump(spec.base))
    for key, value in params.items():
        if key == POLICY_KEY:
            continue
        node = tree
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ValueError(f"{key}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        node[parts[-1]] = value
    if storage is not None:
        tree["storage"] = storage
    return tree


def trial_policy(spec: SweepSpec, params: dict[str, Any]) -> str:
    return str(params.get(POLICY_KEY, spec.default_policy))


def check_trials(spec: SweepSpec, overridden: dict[str, str] | None = None) -> list[Problem]:
    """Every problem of every grid point (unknown keys, bad values, contradictions), each
    distinct problem once, with how many trials have it and one of them. ``overridden``:
    dimension -> the ``space.<key>=[...]`` override that set it (blamed for its problems)."""
    overridden = overridden or {}
    problems: list[Problem] = []
    val = spec.stream.validation_fraction
    where = f"in {spec.source or 'the sweep file'}"
    for name in dimensions(spec).get(POLICY_KEY, []):
        try:
            get_policy(name)
        except (ValueError, TypeError) as e:
            src = f"override '{overridden[POLICY_KEY]}'" if POLICY_KEY in overridden else where
            problems.append(Problem(f"search.space.{POLICY_KEY}", str(e), src))
    model = run_config_model()
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for params in grid_points(spec):
        try:
            cfg, found_here = collect(model, trial_tree(spec, params), Sources.of(where))
            msgs = [(p.key, p.message) for p in found_here]
            if not found_here:
                # the trial's method: what its run would refuse at training time (S3T: the
                # model's blocks against slices and budget; its validation rows against ours)
                msgs = [("", m) for m in registry.sweep_problems(cfg, val)]
        except ValueError as e:
            msgs = [("", str(e))]
        for msg in msgs:
            found.setdefault(msg, []).append(params)
    for (key, msg), trials in found.items():
        which = "trial" if len(trials) == 1 else f"{len(trials)} trials, e.g."
        src = f"override '{overridden[key]}'" if key in overridden else f"{where}, search"
        problems.append(Problem(key, f"{msg} ({which} {trials[0]})", src))
    return problems


def num_trials(spec: SweepSpec) -> int:
    if spec.search.method == "grid":
        return len(grid_points(spec)) * spec.search.num_samples
    return spec.search.num_samples
