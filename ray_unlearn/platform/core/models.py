"""Models as components: a factory named by config builds the model, and the parts that
methods use (the head, the calibrated body, S3T's blocks) are named by config too.

``model.component`` is a built-in short name (``mlp``: an MLP for tabular rows; ``cnn``:
a small CNN for (C, H, W) images; ``hf_encoder``: a pretrained transformer encoder for
text, :mod:`ray_unlearn.platform.core.encoders`) or an import path ``package.module:function``; the
factory is called as ``factory(feature_shape, num_classes, **model.args)`` and returns an
``nn.Module`` that maps a (B, *feature_shape) or (B, prod(feature_shape)) batch to
(B, num_classes) logits. ``model.kind`` with ``hidden`` / ``channels`` is the short form.

No dropout or batch statistics: a model's output must be a pure function of its weights
and input, which is what lets a retrained shard equal one trained from scratch bit for bit
(:func:`check_model` refuses models that break it, at run creation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ray_unlearn.platform.core.config import ConfigError, ModelConfig, resolve_component

ADAPTABLE = (nn.Linear, nn.Conv2d)  # the layer types peft's LoRA adapts here


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, classes)
        return self.head(self.body(x.flatten(1)))


class SmallCNN(nn.Module):
    def __init__(self, in_shape: Sequence[int], channels: Sequence[int], num_classes: int):
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
            c = out
        # Halving even sizes, AvgPool2d(2) is AdaptiveAvgPool2d's result bit for bit (forward
        # and backward, checked on CPU) and has a deterministic CUDA backward, which adaptive
        # pooling lacks (it raises under torch.use_deterministic_algorithms: docs/gpu.md).
        even = h % 2 == 0 and w % 2 == 0
        layers += [
            nn.AvgPool2d(2) if even else nn.AdaptiveAvgPool2d((max(1, h // 2), max(1, w // 2)))
        ]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c * max(1, h // 2) * max(1, w // 2), num_classes)
        self.in_shape = tuple(in_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C*H*W) or (B, C, H, W)
        x = x.reshape(x.shape[0], *self.in_shape)
        return self.head(self.body(x).flatten(1))


def build_mlp(
    feature_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128,)
) -> MLP:
    """Built-in component ``mlp``: any input shape, flattened."""
    return MLP(math.prod(feature_shape), list(hidden), num_classes)


def build_cnn(
    feature_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32)
) -> SmallCNN:
    """Built-in component ``cnn``: (C, H, W) input."""
    if len(feature_shape) != 3:
        raise ValueError(
            f"model.kind=cnn needs image-shaped input (C, H, W); the data has feature shape "
            f"{tuple(feature_shape)}. Set data.feature_shape (e.g. [1, 8, 8]) or use model.kind=mlp"
        )
    return SmallCNN(feature_shape, list(channels), num_classes)


@dataclass(frozen=True)
class Parts:
    """A built model's parts, resolved and checked against it (see :class:`ModelParts`).

    ``blocks`` is None when neither the config nor a built-in default names them."""

    head: str
    body: tuple[str, ...] | None
    blocks: tuple[str, ...] | None


_PARTS_ATTR = "_ray_unlearn_parts"  # a plain attribute: not in the state dict


def body_blocks(model: nn.Module) -> list[str]:
    """The built-in models' adaptable blocks, bottom to top: the model's own
    ``default_blocks()`` when it has one (``hf_encoder``: the encoder's layers), else the
    Linear / Conv2d layers of ``model.body`` (MLP: ``body.0, body.2, ...``; SmallCNN: its
    conv layers)."""
    own = getattr(model, "default_blocks", None)
    if callable(own):
        return list(own())
    body = getattr(model, "body", None)
    if isinstance(body, nn.Sequential):
        return [f"body.{i}" for i, m in enumerate(body) if isinstance(m, ADAPTABLE)]
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, ADAPTABLE) and n.split(".")[0] != "head"
    ]


def has_adaptable(module: nn.Module) -> bool:
    """Whether LoRA can adapt ``module``: a Linear / Conv2d, or a module holding one (a
    transformer layer: its attention projections)."""
    return any(isinstance(m, ADAPTABLE) for m in module.modules())


def text_encoder_of(cfg: ModelConfig):
    """The component's tokenizer, ``texts -> (n, D) float32 rows``, or None when the
    component takes no text. A factory that takes text carries it as ``text_encoder``,
    called with the factory's arguments (``hf_encoder``: its ``model`` and ``max_length``)."""
    make = getattr(resolve_component(cfg.factory), "text_encoder", None)
    return make(**cfg.factory_args()) if make is not None else None


def parts_of(model: nn.Module) -> Parts:
    """The parts :func:`build_model` resolved for ``model``; for a model built otherwise,
    today's convention: ``head``, the rest as body, :func:`body_blocks` as blocks."""
    parts = getattr(model, _PARTS_ATTR, None)
    if isinstance(parts, Parts):
        return parts
    return Parts("head", None, tuple(body_blocks(model)))


def in_module(param_name: str, module: str) -> bool:
    """Whether parameter ``param_name`` belongs to module ``module`` (exact dotted prefix:
    ``body.1`` holds ``body.1.weight``, not ``body.10.weight``)."""
    return param_name.startswith(module + ".")


def head_parameter_names(model: nn.Module) -> list[str]:
    head = parts_of(model).head
    return [n for n, _ in model.named_parameters() if in_module(n, head)]


def calibration_parameter_names(model: nn.Module, which: str) -> list[str]:
    """Names of the parameters the hybrid calibration may move: ``all``, ``head`` (the
    configured head) or ``body`` (the configured body modules; by default everything
    outside the head: for the built-ins, ``body.*``)."""
    parts, names = parts_of(model), [n for n, _ in model.named_parameters()]
    if which == "all":
        return names
    if which == "head":
        return [n for n in names if in_module(n, parts.head)]
    if which == "body":
        if parts.body is None:
            return [n for n in names if not in_module(n, parts.head)]
        return [n for n in names if any(in_module(n, b) for b in parts.body)]
    raise ValueError(f"unknown calibration params {which!r}; allowed: all, body, head")


def _resolve_parts(cfg: ModelConfig, model: nn.Module) -> Parts:
    """Check every named part against the built model; raise ConfigError listing problems."""
    modules = dict(model.named_modules())
    p, problems = cfg.parts, []
    where = f"model.component {cfg.factory!r}"

    def missing(field: str, name: str) -> str:
        return f"model.parts.{field}: {name!r} is not a module of {where} (exact names)"

    head = modules.get(p.head)
    if head is None:
        problems.append(missing("head", p.head))
    elif not any(True for _ in head.parameters()):
        problems.append(f"model.parts.head: {p.head!r} has no parameters to train")
    for name in p.body or []:
        if name not in modules:
            problems.append(missing("body", name))
    for name in p.blocks or []:
        if name not in modules:
            problems.append(missing("blocks", name))
        elif not has_adaptable(modules[name]):
            problems.append(
                f"model.parts.blocks: {name!r} is a {type(modules[name]).__name__}; "
                "LoRA blocks must be Linear or Conv2d, or modules holding such layers"
            )
    if problems:
        named = [n for n in modules if n]
        raise ConfigError(
            f"{where} does not have the parts the config names: "
            + "; ".join(problems)
            + f" (its modules: {', '.join(named[:40])}{' ...' if len(named) > 40 else ''})"
        )
    blocks = p.blocks
    if blocks is None and (cfg.builtin or callable(getattr(model, "default_blocks", None))):
        blocks = body_blocks(model)
    return Parts(p.head, tuple(p.body) if p.body else None, tuple(blocks) if blocks else None)


def build_model(cfg: ModelConfig, feature_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build the configured model for inputs of ``feature_shape`` (per sample), with its
    parts resolved (:func:`parts_of`)."""
    factory = resolve_component(cfg.factory)  # already checked by the config: cannot fail
    try:
        model = factory(tuple(feature_shape), num_classes, **cfg.factory_args())
    except ValueError as e:
        if cfg.builtin:  # the built-ins' own messages name the fix
            raise
        raise ConfigError(
            f"model.component {cfg.factory!r} failed for feature shape {tuple(feature_shape)} "
            f"and {num_classes} classes: {type(e).__name__}: {e}"
        ) from e
    except Exception as e:
        raise ConfigError(
            f"model.component {cfg.factory!r} failed for feature shape {tuple(feature_shape)} "
            f"and {num_classes} classes: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.component {cfg.factory!r} returned a {type(model).__name__}; a model "
            "component must return a torch.nn.Module"
        )
    setattr(model, _PARTS_ATTR, _resolve_parts(cfg, model))
    return model


def impure_modules(model: nn.Module) -> list[str]:
    """Modules that make the output depend on more than the weights and the input:
    dropout (random masks) and batch statistics (each row's output depends on its batch,
    and running statistics are state outside the weights that training updates)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            out.append(f"{name} ({type(m).__name__}(p={m.p}): random masks)")
        elif isinstance(m, nn.modules.batchnorm._NormBase) and (
            isinstance(m, nn.modules.batchnorm._BatchNorm) or m.track_running_stats
        ):
            out.append(f"{name} ({type(m).__name__}: batch statistics)")
    return out


def check_model(cfg: ModelConfig, feature_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build the model once and check what every run assumes of it (run creation calls
    this, before anything is stored): the factory works and returns a module, the named
    parts exist, the output is a pure function of weights and input, and it maps a batch
    of ``feature_shape`` rows to ``num_classes`` logits. Returns the model."""
    with torch.random.fork_rng(devices=[]):  # a throwaway build must not move the global RNG
        model = build_model(cfg, feature_shape, num_classes)
    impure = impure_modules(model)
    if impure:
        raise ConfigError(
            f"model.component {cfg.factory!r}: a retrained shard must equal one trained from "
            "scratch bit for bit, which needs the model's output to be a pure function of its "
            f"weights and input; these modules break that: {', '.join(impure)}. Use dropout "
            "p=0 and a per-sample normalisation (LayerNorm, GroupNorm) instead"
        )
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, math.prod(feature_shape)))
    except Exception as e:
        raise ConfigError(
            f"model.component {cfg.factory!r} cannot take a batch of rows of "
            f"{math.prod(feature_shape)} features (flattened from {tuple(feature_shape)}; "
            f"reshape in forward if it needs the shape): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"model.component {cfg.factory!r} must return (batch, {num_classes}) logits; "
            f"a batch of 2 rows gave {got}"
        )
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
