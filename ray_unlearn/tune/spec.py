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
        serving.policy: [double-lazy-exclude, single-immediate-wait]
    stream: {deletions: 6, seed: 0, predictions: 100}
    ...

``ray-unlearn sweep --config F key=value ...`` overrides: keys of the sweep file
(``stream.deletions=3``), ``space.<run key>=[...]`` to replace one dimension, and any other
dotted key is a run-config override for every trial (``training.epochs=5``). Every grid
point's run config is validated when the sweep is loaded, and every problem is reported at
once, before any trial starts.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ray_unlearn.platform.config import (
    ConfigError,
    RunConfig,
    _format_validation_error,
    load_config,
    parse_overrides,
)
from ray_unlearn.platform.policies import get_policy

POLICY_KEY = "serving.policy"
METRICS = ("accuracy", "unlearn_s", "latency_mean_ms")


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

    @field_validator("space")
    @classmethod
    def _values(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, vals in v.items() if not vals]
        if empty:
            raise ValueError(f"every dimension needs at least one value; empty: {empty}")
        return v


class StreamSpec(_Strict):
    deletions: int = Field(6, ge=1, description="Owner deletions each trial executes.")
    seed: int = Field(0, ge=0, description="Seed of the owners drawn (same for every trial).")
    predictions: int = Field(
        100, ge=1, description="Held-out instances answered at each deletion step."
    )


class StopSpec(_Strict):
    min_accuracy: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Stop a trial as soon as its accuracy during the stream falls below "
        "this (a hopeless trial); None: never.",
    )
    asha: bool = Field(
        False,
        description="Also use Tune's ASHA scheduler on accuracy per deletion step (useful "
        "with many trials running concurrently).",
    )


class MlflowSpec(_Strict):
    tracking_uri: str | None = Field(
        None,
        description="None: $MLFLOW_TRACKING_URI, else SQLite under the storage root "
        "(<root>/mlflow/mlflow.db, artifacts beside it).",
    )
    experiment: str = Field("ray-unlearn-sweeps")


class SelectSpec(_Strict):
    """Which Pareto-optimal configuration is written out as the chosen one."""

    metric: Literal["accuracy", "unlearn_s", "latency_mean_ms"] = "accuracy"
    mode: Literal["max", "min"] = "max"


class SweepSpec(_Strict):
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    base_config: str = Field(..., description="Run config YAML (relative to the sweep file).")
    overrides: list[str] = Field(default_factory=list)
    search: SearchSpec = Field(default_factory=SearchSpec)
    stream: StreamSpec = Field(default_factory=StreamSpec)
    stop: StopSpec = Field(default_factory=StopSpec)
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
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
        "double-lazy-exclude", description="ERASER preset when the space has no serving.policy."
    )

    # filled by load_sweep
    source: str = ""
    base: dict[str, Any] = Field(default_factory=dict, description="Base run config (resolved).")


def _split_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """-> (sweep-file tree, run-config overrides, space replacements)."""
    sweep_keys = set(SweepSpec.model_fields) - {"source", "base"}
    sweep, run, space = [], [], {}
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if key.startswith("space."):
            space[key.removeprefix("space.")] = yaml.safe_load(o.split("=", 1)[1])
        elif key.split(".", 1)[0] in sweep_keys:
            sweep.append(o)
        else:
            run.append(o)
    return parse_overrides(sweep), run, space


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read, override and validate a sweep file, and every trial's run config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {p} not found")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep file {p} is not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"sweep file {p} must hold a mapping, not {type(tree).__name__}")
    sweep_tree, run_overrides, space = _split_overrides(overrides or [])
    _merge(tree, sweep_tree)
    for k, v in space.items():
        tree.setdefault("search", {}).setdefault("space", {})[k] = v if isinstance(v, list) else [v]
    tree["overrides"] = [*tree.get("overrides", []), *run_overrides]
    try:
        spec = SweepSpec.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, f"(sweep) {p}")) from None
    base_path = (p.parent / spec.base_config).resolve()
    base = load_config(base_path, spec.overrides)
    spec.source = str(p.resolve())
    spec.base = base.model_dump(mode="json")
    problems = check_trials(spec)
    if problems:
        raise ConfigError(f"invalid sweep {p}: {len(problems)} problem(s)\n" + "\n".join(problems))
    return spec


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    keys = list(spec.search.space)
    return [
        dict(zip(keys, combo, strict=True))
        for combo in itertools.product(*(spec.search.space[k] for k in keys))
    ]


def trial_config(spec: SweepSpec, params: dict[str, Any], storage: str | None = None) -> RunConfig:
    """The run config of one trial: base + the trial's values (serving.policy excluded)."""
    tree = yaml.safe_load(yaml.safe_dump(spec.base))
    for key, value in params.items():
        if key == POLICY_KEY:
            continue
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    if storage is not None:
        tree["storage"] = storage
    return RunConfig.model_validate(tree)


def trial_policy(spec: SweepSpec, params: dict[str, Any]) -> str:
    return str(params.get(POLICY_KEY, spec.default_policy))


def check_trials(spec: SweepSpec) -> list[str]:
    """Every problem of every grid point (unknown keys, bad values, contradictions)."""
    problems: list[str] = []
    for key in spec.search.space:
        if key == POLICY_KEY:
            for name in spec.search.space[key]:
                try:
                    get_policy(name)
                except (ValueError, TypeError) as e:
                    problems.append(f"  - space.{POLICY_KEY}: {e}")
    seen = set()
    for params in grid_points(spec):
        try:
            trial_config(spec, params)
        except ValidationError as e:
            for err in e.errors():
                loc = ".".join(str(x) for x in err["loc"])
                msg = f"  - {loc}: {err['msg'].removeprefix('Value error, ')} (trial {params})"
                if msg not in seen:
                    seen.add(msg)
                    problems.append(msg)
    return problems


def num_trials(spec: SweepSpec) -> int:
    if spec.search.method == "grid":
        return math.prod(len(v) for v in spec.search.space.values()) * spec.search.num_samples
    return spec.search.num_samples
