"""Typed run configuration, loaded from YAML plus ``key=value`` overrides.

Every problem in a config is reported at once (pydantic collects them), with the field's
dotted path and what is allowed. A resolved config is stored with each run, so a run can
always be rebuilt from its own folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from ray_unlearn.platform.core.data import DataConfig


class ConfigError(ValueError):
    """A config file or override is invalid; the message lists every problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PartitionConfig(_Strict):
    shards: int = Field(
        4, ge=1, le=1024, description="K: number of disjoint shards (one model each)."
    )
    slices: int = Field(
        3, ge=1, le=256, description="R: slices per shard (a checkpoint after each)."
    )
    group_by: Literal["owner", "sample"] = Field(
        "owner",
        description="owner: all samples of an owner share a shard and slice, so one owner's "
        "deletion retrains one shard from one slice; sample: samples are placed independently.",
    )


BUILTIN_COMPONENTS = {
    "mlp": "ray_unlearn.platform.core.models:build_mlp",
    "cnn": "ray_unlearn.platform.core.models:build_cnn",
}


def resolve_component(spec: str) -> Any:
    """The factory a ``model.component`` names: a built-in short name (``mlp``, ``cnn``) or
    ``package.module:function``. Raises ValueError naming ``spec`` and what is allowed."""
    import importlib

    allowed = (
        f"a built-in ({', '.join(BUILTIN_COMPONENTS)}) or an import path "
        "'package.module:function' of a factory (feature_shape, num_classes, **args) -> nn.Module"
    )
    path = BUILTIN_COMPONENTS.get(spec, spec)
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model.component {spec!r} is not {allowed}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or an error raised while the module runs
        raise ValueError(
            f"model.component {spec!r}: cannot import module {module_name!r} "
            f"({type(e).__name__}: {e}); expected {allowed}"
        ) from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(
                f"model.component {spec!r}: module {module_name!r} has no attribute {attr!r}; "
                f"expected {allowed}"
            )
    if not callable(factory):
        raise ValueError(f"model.component {spec!r} is a {type(factory).__name__}, not callable")
    return factory


class ModelParts(_Strict):
    """The parts of a model that methods use, by module name (``dict(model.named_modules())``
    keys, matched exactly). The defaults are the built-in models' ``body`` and ``head``."""

    head: str = Field(
        "head",
        description="The output layer: S3T trains one copy per order; calibration's `head`.",
    )
    body: list[str] | None = Field(
        None,
        description="Modules whose weights are the hybrid calibration's `body` (the feature "
        "layers it may move); None = every parameter outside the head.",
    )
    blocks: list[str] | None = Field(
        None,
        description="S3T's LoRA blocks (Linear or Conv2d), bottom to top, one per slice; "
        "None = the built-in models' hidden Linear / conv layers (a user component must "
        "name them, here or in s3t.block_names).",
    )

    @field_validator("head")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v:
            raise ValueError("the head must be a module name (the built-ins' is 'head')")
        return v

    @field_validator("body", "blocks")
    @classmethod
    def _distinct(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v or any(not n for n in v):
                raise ValueError(f"must be a non-empty list of module names, got {v}")
            repeated = sorted({n for n in v if v.count(n) > 1})
            if repeated:
                raise ValueError(f"module names repeated: {', '.join(repeated)}")
        return v


_LEGACY = ("kind", "hidden", "channels")


class ModelConfig(_Strict):
    """The model: a component (a factory named by import path, or a built-in) and its parts.

    ``kind: mlp|cnn`` with ``hidden`` / ``channels`` is the short form of ``component: mlp``
    / ``cnn`` and stays as it is (a config written that way dumps, and so digests, exactly
    as before ``component`` existed)."""

    component: str | None = Field(
        None,
        description="Factory of the model: 'mlp', 'cnn' or 'package.module:function', called "
        "as factory(feature_shape, num_classes, **args) -> torch.nn.Module; None = model.kind.",
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the component's factory."
    )
    kind: Literal["mlp", "cnn"] = Field(
        "mlp", description="mlp for tabular rows, cnn for (C, H, W) images."
    )
    hidden: list[int] = Field(
        default_factory=lambda: [128], description="Hidden widths of the MLP."
    )
    channels: list[int] = Field(
        default_factory=lambda: [16, 32], description="Conv channels of the CNN."
    )
    parts: ModelParts = Field(
        default_factory=ModelParts, description="Module names of the parts methods use."
    )

    @field_validator("hidden", "channels")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(w < 1 for w in v):
            raise ValueError(f"must be a non-empty list of positive widths, got {v}")
        return v

    @field_validator("component")
    @classmethod
    def _importable(cls, v: str | None) -> str | None:
        if v is not None:
            resolve_component(v)
        return v

    @model_validator(mode="after")
    def _one_form(self) -> ModelConfig:
        legacy = sorted(set(_LEGACY) & self.model_fields_set)
        if self.component is not None and legacy:
            raise ValueError(
                f"model.{', model.'.join(legacy)} is the short form of model.component "
                f"(mlp|cnn); with model.component={self.component!r} set, put the factory's "
                "arguments in model.args"
            )
        if self.component is None and self.args:
            raise ValueError("model.args are the arguments of model.component: set it too")
        if self.component is not None:
            import inspect

            factory = resolve_component(self.component)
            try:
                inspect.signature(factory).bind((1,), 2, **self.args)
            except TypeError as e:
                raise ValueError(
                    f"model.component {self.component!r} cannot take model.args "
                    f"{sorted(self.args)}: {e}"
                ) from None
            except ValueError:  # no signature to check (a builtin): checked when built
                pass
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # Only what was chosen: a config of the short form dumps exactly as before
        # `component` and `parts` existed, so its digest (sha256 of the dumped YAML) holds.
        out = handler(self)
        if self.component is None:
            out.pop("component", None)
            out.pop("args", None)
        else:
            for k in _LEGACY:
                out.pop(k, None)
        if self.parts == ModelParts():
            out.pop("parts", None)
        return out

    @property
    def factory(self) -> str:
        """The component's name: ``component``, or ``kind`` in the short form."""
        return self.component if self.component is not None else self.kind

    @property
    def builtin(self) -> bool:
        return self.factory in BUILTIN_COMPONENTS

    def factory_args(self) -> dict[str, Any]:
        """Keyword arguments of the factory (the short form's widths for ``kind``)."""
        if self.component is not None:
            return dict(self.args)
        if self.kind == "mlp":
            return {"hidden": list(self.hidden)}
        return {"channels": list(self.channels)}


class TrainingConfig(_Strict):
    epochs: int = Field(
        10, ge=1, description="Passes over each shard's data, spread over its slices."
    )
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    torch_threads: int = Field(
        0,
        ge=0,
        description="Intra-op threads of every training step. Results are bit-for-bit "
        "reproducible only for a fixed count, so a run pins it when created (0 = this "
        "machine's CPUs, at most 4) and its retraining uses the same.",
    )
    num_workers: int = Field(
        0,
        ge=0,
        description="Ray Train workers; 0 = one per shard. Worker w owns shards k % W == w.",
    )
    cpus_per_worker: float = Field(
        0.0, ge=0, description="CPUs reserved per worker; 0 = fit the cluster."
    )


class UnlearningConfig(_Strict):
    strategy: str = Field(
        "sisa", description="Registered unlearning strategy (see `ray-unlearn strategies`)."
    )
    aggregation: Literal["vote", "mean_prob"] = Field(
        "vote",
        description="vote: plurality of shard labels; mean_prob: argmax of mean probabilities.",
    )
    max_concurrent_shards: int = Field(
        0, ge=0, description="Shards retrained at once by the executor; 0 = CPUs / torch_threads."
    )


class S3TConfig(BaseModel):
    """S3T settings. Cross-checks against a model and a partition: :func:`check_s3t`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    budget: int = Field(3, ge=1, description="B: slice orders trained per shard.")
    selection: Literal["cyclic", "bms"] = Field(
        "cyclic", description="cyclic rotation or bipartite-matching selection of the orders."
    )
    deletion_prior: list[float] | None = Field(
        None, description="bms only: per-slice deletion probabilities (None = uniform)."
    )
    lora_rank: int = Field(4, ge=1, description="r of every LoRA adapter.")
    lora_alpha: float = Field(8.0, gt=0, description="LoRA alpha (scaling = alpha / r).")
    block_names: list[str] | None = Field(
        None,
        description="Module names of the L adapted blocks, bottom to top; None = the "
        "model's hidden Linear layers (MLP: body.0, body.2, ...) or conv layers (CNN).",
    )
    public_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Part of the training data (by owner) that pre-trains the backbone; "
        "declared public: not subject to deletion.",
    )
    pretrain_epochs: int = Field(20, ge=0, description="Backbone passes over the public data.")
    epochs: int = Field(
        10, ge=1, description="Per order: passes over the shard's data (like training.epochs)."
    )
    lr: float = Field(1e-2, gt=0, description="Adam learning rate of the adapters and heads.")
    pretrain_lr: float = Field(
        2e-3,
        gt=0,
        description="Adam learning rate of full-weight training (the backbone, and the full "
        "fine-tuning reference); LoRA usually wants a larger rate than full training.",
    )
    batch_size: int = Field(32, ge=1)
    retrain_depth_threshold: int = Field(
        1,
        ge=1,
        description="A shard is queued for retraining when its best surviving prefix falls "
        "below this depth (1: only when it is dead).",
    )
    retrain_accuracy_threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Also retrain every truncated shard when the ensemble's accuracy on the "
        "validation rows falls below this (None: depth threshold only).",
    )
    validation_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Part of the held-out rows (seeded by sample id) the accuracy trigger "
        "measures; no training ever sees them.",
    )
    background_restore: bool = Field(
        True,
        description="Executor actors retrain too-shallow shards in the background (the "
        "deletion is answered first); a one-off in-process `forget` always restores inline.",
    )

    @field_validator("block_names")
    @classmethod
    def _names(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("must name at least one block, or be null for the model's defaults")
        bad = [n for n in v if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ValueError(f"block names must be non-empty strings, got {bad}")
        dup = sorted({n for n in v if v.count(n) > 1})
        if dup:
            raise ValueError(f"each block can be adapted once; repeated: {', '.join(dup)}")
        return v

    @field_validator("deletion_prior")
    @classmethod
    def _prior(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (
            not v or any(not math.isfinite(p) or p < 0 for p in v) or sum(v) <= 0
        ):
            raise ValueError(f"must be finite non-negative probabilities, not all 0; got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> S3TConfig:
        if self.deletion_prior is not None and self.selection != "bms":
            raise ValueError(
                "deletion_prior is only used by selection=bms; drop it or set selection: bms"
            )
        return self


class HybridConfig(_Strict):
    """Hybrid exact/approximate unlearning (strategies ``dpus``, ``hs``, ``ohs``)."""

    record: bool = Field(
        False,
        description="Record each training batch's parameter update and sample ids beside "
        "every slice checkpoint (what DPUS subtracts). Needed by dpus/hs/ohs.",
    )
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Encoding of the recorded updates (storage vs. precision)."
    )
    threshold: float = Field(
        0.04,
        ge=0,
        description="HS/OHS: exact retraining when the predicted retraining time of a batch "
        "of requests is <= this; otherwise a direct parameter update (DPUS).",
    )
    threshold_unit: Literal["fraction", "seconds"] = Field(
        "fraction",
        description="fraction: of the predicted time of a full retrain of every shard; "
        "seconds: predicted seconds.",
    )
    scope: Literal["batch", "shard"] = Field(
        "batch",
        description="batch: one decision for a whole batch of requests (its workload summed "
        "over the affected shards); shard: one decision per affected shard.",
    )
    route_gap: float | None = Field(
        None,
        ge=0,
        le=1,
        description="HS/OHS: a shard's part of a batch that the workload rule sends to DPUS is "
        "retrained exactly instead when the shard's serving model gives the revoked rows a "
        "mean true-class probability more than this above what the other shards' serving "
        "models (which never saw them) give: rows the model remembers, which a direct update "
        "leaves recognisable to a membership attack. None: the workload rule alone.",
    )
    dpus_scale: Literal["batch", "share"] = Field(
        "share",
        description="batch: subtract the whole update of every batch that held a revoked "
        "sample (the paper's DPUS); share: subtract dpus_share_factor times the revoked "
        "samples' share of it (count / batch size).",
    )
    dpus_share_factor: float = Field(
        8.0,
        ge=1,
        description="share: subtract this many times the revoked samples' share of each "
        "batch update (at most the whole update).",
    )
    dpus_momentum: bool = Field(
        False,
        description="Remove each revoked batch's gradient as it acted through the optimizer's "
        "momentum (this and the following steps) rather than its step's raw update, which "
        "with momentum (Adam, SGD 0.9) mostly carries earlier batches' gradients.",
    )
    ohs_slices: Literal["last", "affected", "all"] = Field(
        "affected",
        description="OHS fine-tunes the serving model on the remaining rows of: the last "
        "slice, the first affected slice onward, or all slices.",
    )
    ohs_validation_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Share of the shard's remaining rows held out (not trained on) to stop "
        "OHS fine-tuning when their loss stops improving.",
    )
    ohs_max_epochs: int = Field(2, ge=0, description="Cap on OHS fine-tuning passes.")
    ohs_patience: int = Field(
        1, ge=1, description="Passes without a lower validation loss before OHS stops."
    )
    ohs_lr: float | None = Field(
        1e-4, gt=0, description="OHS fine-tuning learning rate; None = training.lr."
    )
    calibrate_forget: bool = Field(
        False,
        description="After every direct parameter update (dpus, and hs/ohs when they take "
        "it), raise the revoked rows' loss on the serving model to that of rows it never saw "
        "(other shards' rows: it needs two or more shards), with a retain loss beside it "
        "(platform/methods/hybrid/workload.py calibrate_forget).",
    )
    calibrate_depth: int | None = Field(
        2,
        ge=1,
        description="How many of the newest corrected snapshots to calibrate: None = all "
        "(restart points too, so a later exact retrain does not restart from weights that "
        "still fit the revoked rows); 1 = the serving one only; 2 = it and the restart point "
        "of a one-stage exact retrain (what hs does at a small threshold).",
    )
    calibrate_fraction: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Stop once this share of the revoked rows' total shortfall below their "
        "targets is closed (1: every row at its target).",
    )
    calibrate_target: Literal["quantile", "teacher"] = Field(
        "quantile",
        description="quantile: raise each revoked row's loss to a rank-matched loss of other "
        "shards' rows on this shard's model; teacher: move each revoked row's prediction to "
        "the mean prediction of the other shards' models at the same stage (models that "
        "never saw it), falling back to quantile where no such shard exists.",
    )
    calibrate_params: Literal["all", "head", "body"] = Field(
        "body",
        description="Which weights calibration may change: all; body: the feature layers "
        "(the output layer stays: its class weights are shared by every row of a class, "
        "so moving them to forget a few rows costs their whole class); head: the output "
        "layer only.",
    )
    calibrate_batch_size: int | None = Field(
        None, ge=1, description="Retain rows per calibration step; None = training.batch_size."
    )
    calibrate_reference_rows: int = Field(
        1024, ge=1, description="Other shards' rows whose losses set the calibration targets."
    )
    calibrate_max_steps: int = Field(
        100, ge=0, description="Cap on calibration steps per shard and request batch."
    )
    calibrate_lr: float | None = Field(
        3e-4,
        gt=0,
        description="Calibration learning rate; None = training.lr. A fresh Adam's first "
        "steps move every weight by about the rate: at the training rate (1e-3 on Purchase) "
        "they overshoot the targets and cost accuracy, at 1e-4 they take too many steps.",
    )


class RumConfig(_Strict):
    """Memorization-aware approximate unlearning (strategy ``rum``)."""

    score: Literal[
        "confidence", "max_confidence", "entropy", "binary_accuracy", "holdout_kl", "exact"
    ] = Field(
        "confidence",
        description="Memorization score that splits the deleted samples into thirds. The four "
        "training proxies are running means over the shard's slice checkpoints, read when the "
        "request executes (nothing to precompute); holdout_kl and exact are read from the "
        "scores stored with the run (platform.memorization.compute_run_scores).",
    )
    low: str | None = Field("finetune", description="Algorithm for the low-memorization third.")
    medium: str | None = Field("neggrad_plus", description="... for the medium third.")
    high: str | None = Field("salun", description="... for the high third (null: skip).")
    epochs: int = Field(3, ge=1, description="Passes of each group's algorithm.")
    lr: float = Field(1e-3, gt=0)
    route_quantile: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Memorization-aware routing: a request whose samples' mean memorization "
        "ranks at or above this quantile of the shard's rows is retrained exactly (SISA); "
        "the others are unlearnt approximately. None: always approximate.",
    )
    route_by: Literal["memorization", "random"] = Field(
        "memorization",
        description="random: route the same share of requests (1 - route_quantile) to exact "
        "retraining by a seeded coin instead of by memorization: the control that shows "
        "whether memorization is what makes routing pay.",
    )

    @field_validator("low", "medium", "high")
    @classmethod
    def _algorithm(cls, v: str | None) -> str | None:
        from ray_unlearn.platform.methods.approximate import ALGORITHMS

        if v is not None and v not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {v!r}; allowed: {', '.join(ALGORITHMS)} or null")
        return v

    @model_validator(mode="after")
    def _some_algorithm(self) -> RumConfig:
        if self.low is None and self.medium is None and self.high is None:
            raise ValueError(
                "rum.low, rum.medium and rum.high are all null: name an algorithm for at "
                "least one group, or nothing is unlearnt"
            )
        return self


APPROXIMATE_STRATEGIES = ("dpus", "hs", "ohs")  # need hybrid.record


class RunConfig(_Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    seed: int = Field(0, ge=0)
    storage: str = Field(
        "./runs", description="Storage root: a local directory or any pyarrow.fs URI."
    )
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    unlearning: UnlearningConfig = Field(default_factory=UnlearningConfig)
    hybrid: HybridConfig = Field(default_factory=HybridConfig)
    rum: RumConfig = Field(default_factory=RumConfig)
    s3t: S3TConfig | None = Field(
        None,
        description="S3T settings; used when unlearning.strategy is s3t (defaults if omitted).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        from ray_unlearn.platform.methods import available_strategies

        problems = []
        if self.unlearning.strategy not in [*available_strategies(), "s3t"]:
            problems.append(
                f"unlearning.strategy: unknown strategy {self.unlearning.strategy!r}; "
                f"available: {', '.join([*available_strategies(), 's3t'])}"
            )
        if self.unlearning.strategy in APPROXIMATE_STRATEGIES and not self.hybrid.record:
            problems.append(
                f"unlearning.strategy={self.unlearning.strategy} subtracts recorded training "
                "updates: set hybrid.record=true (contributions are recorded while training)"
            )
        if self.hybrid.threshold_unit == "fraction" and self.hybrid.threshold > 1:
            problems.append(
                f"hybrid.threshold ({self.hybrid.threshold}) is a fraction of a full retrain "
                "(hybrid.threshold_unit=fraction): it must be <= 1"
            )
        if self.training.num_workers > self.partition.shards:
            problems.append(
                f"training.num_workers ({self.training.num_workers}) exceeds partition.shards "
                f"({self.partition.shards}): a worker would own no shard"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}: {err.error_count()} problem(s)"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(
            f"  - {loc}: {msg}"
            + (
                f" (got {e['input']!r})"
                if "input" in e and not isinstance(e["input"], dict)
                else ""
            )
        )
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["partition.shards=8", "model.hidden=[64,64]"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise ConfigError(
            f"overrides must look like key=value (dotted keys allowed), got: {', '.join(bad)}"
        )
    for o in overrides:
        key, raw = o.split("=", 1)
        _set_dotted(tree, key.strip(), parse_override_value(o, raw))
    return tree


def parse_override_value(override: str, raw: str) -> Any:
    """The value of ``key=value``, parsed as YAML (``[64,64]`` is a list, ``0.5`` a float);
    a value that does not parse is blamed on the override, not on the config file."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"override {override!r}: the value {raw!r} is not valid YAML ({problem}); "
            "to pass it as a string, quote it inside the value: key=\"'...'\""
        ) from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    path: str | os.PathLike[str] | None, overrides: list[str] | None = None
) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {source} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {source} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(
                f"config file {source} must hold a mapping, got {type(tree).__name__}"
            )
    tree = _merge(tree, parse_overrides(overrides or []))
    return config_from_dict(tree, source)


def config_from_dict(tree: dict[str, Any], source: str = "(dict)") -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
