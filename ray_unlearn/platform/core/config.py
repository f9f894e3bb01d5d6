"""Typed run configuration, loaded from YAML plus ``key=value`` overrides.

Every problem in a config is reported at once (pydantic collects them), with the field's
dotted path and what is allowed. A resolved config is stored with each run, so a run can
always be rebuilt from its own folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from ray_unlearn.platform.core.config_errors import (
    ConfigError,
    Problems,
    Sources,
    collect,
    did_you_mean,
    report,
)
from ray_unlearn.platform.core.data import DataConfig

__all__ = ["ConfigError", "CoreRunConfig", "config_from_dict", "load_config", "parse_overrides"]


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
    "hf_encoder": "ray_unlearn.platform.core.encoders:build_hf_encoder",
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
        description="Factory of the model: 'mlp', 'cnn', 'hf_encoder' (a pretrained transformer "
        "encoder; see docs/models.md) or 'package.module:function', called "
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
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where training and prediction run: auto = CUDA when this process may "
        "use a GPU (under Ray: one was granted, see resources.gpus_per_worker), else CPU; "
        "cuda = a GPU or a clear error. Deterministic kernels on CUDA (docs/gpu.md).",
    )

    def pinned_threads(self) -> int:
        """The thread count a run created with this config trains with: ``torch_threads``,
        or for 0 this machine's CPUs, at most 4."""
        return self.torch_threads or min(4, os.cpu_count() or 1)


class ResourcesConfig(_Strict):
    """What each Ray process of a run reserves beyond CPUs."""

    gpus_per_worker: float = Field(
        0.0,
        ge=0,
        description="GPUs per Ray Train worker and per shard actor of the executor (a "
        "fraction shares one GPU, e.g. 0.25 puts four shards on it); 0 = CPU only.",
    )


class ServingConfig(_Strict):
    """What each Serve shard replica reserves (`ray-unlearn serve`, configs/serve.yaml)."""

    gpus_per_replica: float = Field(
        0.0, ge=0, description="GPUs per shard deployment replica; 0 = CPU only."
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


class CoreRunConfig(_Strict):
    """The run's own sections. The full :data:`RunConfig` adds the sections the registered
    methods own (one top-level key each): see :func:`run_config_model`."""

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
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> CoreRunConfig:
        from ray_unlearn.platform.methods import registry

        problems = []
        names = registry.strategy_names()
        if self.unlearning.strategy not in names:
            problems.append(
                f"unlearning.strategy: unknown strategy {self.unlearning.strategy!r}; "
                f"available: {', '.join(names)}" + did_you_mean(self.unlearning.strategy, names)
            )
        problems += registry.config_problems(self)
        if self.training.num_workers > self.partition.shards:
            problems.append(
                f"training.num_workers ({self.training.num_workers}) exceeds partition.shards "
                f"({self.partition.shards}): a worker would own no shard"
            )
        if self.training.device == "cpu" and self.resources.gpus_per_worker > 0:
            problems.append(
                f"resources.gpus_per_worker ({self.resources.gpus_per_worker}) reserves GPUs "
                "that training.device=cpu never uses: set training.device to auto or cuda, or "
                "gpus_per_worker to 0"
            )
        if problems:
            raise Problems(problems)
        return self


_ASSEMBLED: dict[int, type[CoreRunConfig]] = {}


def run_config_model() -> type[CoreRunConfig]:
    """The run config class: :class:`CoreRunConfig` plus one field per section of a registered
    method (``ray_unlearn.platform.methods`` registers the built-in ones when imported), built
    once per state of the registry. Module attribute ``RunConfig`` is this class."""
    from ray_unlearn.platform.methods import registry

    gen = registry.generation()
    if gen not in _ASSEMBLED:
        fields: dict[str, Any] = {}
        for sec in registry.config_sections():
            if sec.optional:
                fields[sec.key] = (sec.model | None, Field(None, description=sec.description))
            else:
                fields[sec.key] = (
                    sec.model,
                    Field(default_factory=sec.model, description=sec.description),
                )
        model = create_model("RunConfig", __base__=CoreRunConfig, __module__=__name__, **fields)
        _ASSEMBLED.clear()  # one live class: pickles find it as this module's RunConfig
        _ASSEMBLED[gen] = model
    return _ASSEMBLED[gen]


if TYPE_CHECKING:
    RunConfig = CoreRunConfig
else:

    def __getattr__(name: str) -> Any:
        # assembled on first use, not at import: the methods import core modules themselves
        if name == "RunConfig":
            return run_config_model()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
) -> CoreRunConfig:
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
    overrides = list(overrides or [])
    tree = _merge(tree, parse_overrides(overrides))
    return config_from_dict(tree, source, overrides)


def config_from_dict(
    tree: dict[str, Any], source: str = "(dict)", overrides: list[str] | None = None
) -> CoreRunConfig:
    """Validate a config tree; ConfigError lists every problem (field errors and the
    cross-section ones of the valid fields), each blamed on ``source`` (the file) or on the
    override that set it."""
    model = run_config_model()
    sources = Sources.of(f"in {source}" if source != "(defaults)" else "default", overrides or [])
    cfg, problems = collect(model, tree, sources)
    if problems or cfg is None:
        raise report(f"invalid config {source}", problems)
    return cfg


def config_to_yaml(cfg: CoreRunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
