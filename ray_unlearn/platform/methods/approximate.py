"""Approximate unlearning algorithms behind one interface.

``unlearn(name, model, forget, retain, settings)`` changes a copy of ``model`` so that it
behaves less like a model trained on ``forget`` while keeping its accuracy on ``retain``;
``forget`` and ``retain`` are (features, labels) tensors. The algorithms:

* ``finetune``     train on the retain set only (forgetting by catastrophic interference);
* ``neggrad``      gradient *ascent* on the forget set's loss;
* ``neggrad_plus`` descent on retain and ascent on forget, weighted ``alpha`` / ``1-alpha``;
* ``l1_sparse``    fine-tune on retain with an L1 penalty on the weights (decaying);
* ``random_label`` train on the forget set with random wrong labels, plus the retain set;
* ``salun``        a saliency mask (the weights with the largest forget-loss gradient, a
                   fraction ``mask_fraction``) restricts random-label training to them;
* ``scrub``        teacher (the original model) and student: alternately push the student's
                   outputs away from the teacher on forget (max KL) and keep them close on
                   retain (min KL + cross-entropy).

All are plain torch, seeded, and leave the input model untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ApproxSettings:
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    alpha: float = 0.9  # neggrad_plus: weight of the retain loss
    l1: float = 5e-4  # l1_sparse: initial penalty (linearly decayed to 0)
    mask_fraction: float = 0.5  # salun: share of weights updated
    scrub_max_epochs: int = 2  # scrub: epochs with a forget (max) step
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be {rule}, got {getattr(self, name)}"
            for name, ok, rule in (
                ("epochs", self.epochs >= 1, ">= 1"),
                ("lr", self.lr > 0, "> 0"),
                ("batch_size", self.batch_size >= 1, ">= 1"),
                ("alpha", 0 <= self.alpha <= 1, "in [0, 1]"),
                ("l1", self.l1 >= 0, ">= 0"),
                ("mask_fraction", 0 < self.mask_fraction <= 1, "in (0, 1]"),
                ("scrub_max_epochs", self.scrub_max_epochs >= 0, ">= 0"),
            )
            if not ok
        ]
        if problems:
            raise ValueError("ApproxSettings: " + "; ".join(problems))


def _batches(data: Batch, size: int, g: torch.Generator):
    x, y = data
    for idx in torch.randperm(len(y), generator=g).split(size):
        yield x[idx], y[idx]


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _step(opt, loss: torch.Tensor, mask: dict[nn.Parameter, torch.Tensor] | None = None) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if mask is not None:
        for p, m in mask.items():
            if p.grad is not None:
                p.grad.mul_(m)
    opt.step()


def _finetune(model, forget, retain, s, g, *, l1: float = 0.0):
    opt = torch.optim.Adam(_params(model), lr=s.lr)
    for e in range(s.epochs):
        w = l1 * (1 - e / max(s.epochs, 1))
        for x, y in _batches(retain, s.batch_size, g):
            loss = F.cross_entropy(model(x), y)
            if w:
                loss = loss + w * sum(p.abs().sum() for p in _params(model))
            _step(opt, loss)


def _neggrad(model, forget, retain, s, g):
    opt = torch.optim.Adam(_params(model), lr=s.lr)
    for _ in range(s.epochs):
        for x, y in _batches(forget, s.batch_size, g):
            _step(opt, -F.cross_entropy(model(x), y))


def _neggrad_plus(model, forget, retain, s, g):
    opt = torch.optim.Adam(_params(model), lr=s.lr)
    fx, fy = forget
    for _ in range(s.epochs):
        for x, y in _batches(retain, s.batch_size, g):
            j = torch.randint(len(fy), (min(len(fy), s.batch_size),), generator=g)
            loss = s.alpha * F.cross_entropy(model(x), y) - (1 - s.alpha) * F.cross_entropy(
                model(fx[j]), fy[j]
            )
            _step(opt, loss)


def _random_labels(y: torch.Tensor, classes: int, g: torch.Generator) -> torch.Tensor:
    shift = torch.randint(1, classes, y.shape, generator=g)
    return (y + shift) % classes  # always a wrong label


def _random_label(model, forget, retain, s, g, *, mask=None):
    opt = torch.optim.Adam(_params(model), lr=s.lr)
    fx, fy = forget
    classes = model(fx[:1]).shape[1]
    for _ in range(s.epochs):
        wrong = _random_labels(fy, classes, g)
        x = torch.cat([fx, retain[0]])
        y = torch.cat([wrong, retain[1]])
        for bx, by in _batches((x, y), s.batch_size, g):
            _step(opt, F.cross_entropy(model(bx), by), mask)


def saliency_mask(model: nn.Module, forget: Batch, fraction: float) -> dict:
    """1 on the ``fraction`` of weights with the largest |forget-loss gradient|, else 0."""
    if not 0 < fraction <= 1:
        raise ValueError(f"mask_fraction must be in (0, 1], got {fraction}")
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(forget[0]), forget[1]).backward()
    params = [p for p in _params(model) if p.grad is not None]
    flat = torch.cat([p.grad.abs().flatten() for p in params])
    k = max(1, int(round(fraction * flat.numel())))
    cut = torch.topk(flat, k).values.min()
    mask = {p: (p.grad.abs() >= cut).float() for p in params}
    model.zero_grad(set_to_none=True)
    return mask


def _salun(model, forget, retain, s, g):
    _random_label(model, forget, retain, s, g, mask=saliency_mask(model, forget, s.mask_fraction))


def _kl(student_logits, teacher_logits) -> torch.Tensor:
    return F.kl_div(
        F.log_softmax(student_logits, 1), F.softmax(teacher_logits, 1), reduction="batchmean"
    )


def _scrub(model, forget, retain, s, g):
    teacher = copy.deepcopy(model).eval()
    opt = torch.optim.Adam(_params(model), lr=s.lr)
    for e in range(s.epochs):
        if e < s.scrub_max_epochs:  # max step: move away from the teacher on forget
            for x, _ in _batches(forget, s.batch_size, g):
                with torch.no_grad():
                    t = teacher(x)
                _step(opt, -_kl(model(x), t))
        for x, y in _batches(retain, s.batch_size, g):  # min step: stay close on retain
            with torch.no_grad():
                t = teacher(x)
            out = model(x)
            _step(opt, _kl(out, t) + F.cross_entropy(out, y))


# algorithms whose only signal about what to keep is the retain set (empty: they do nothing)
NEEDS_RETAIN = ("finetune", "neggrad_plus", "l1_sparse", "scrub")

ALGORITHMS: dict[str, Callable] = {
    "finetune": _finetune,
    "neggrad": _neggrad,
    "neggrad_plus": _neggrad_plus,
    "l1_sparse": lambda m, f, r, s, g: _finetune(m, f, r, s, g, l1=s.l1),
    "random_label": _random_label,
    "salun": _salun,
    "scrub": _scrub,
}


def unlearn(
    name: str,
    model: nn.Module,
    forget: Batch,
    retain: Batch,
    settings: ApproxSettings | None = None,
) -> nn.Module:
    """A copy of ``model`` unlearnt of ``forget`` by algorithm ``name``."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown approximate algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
    if not len(forget[1]):
        raise ValueError("the forget set is empty: nothing to unlearn")
    if name in NEEDS_RETAIN and not len(retain[1]):
        raise ValueError(
            f"{name} trains on the retain set, which is empty; use one of "
            f"{', '.join(a for a in ALGORITHMS if a not in NEEDS_RETAIN)} instead"
        )
    s = settings or ApproxSettings()
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(s.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        out.train()
        ALGORITHMS[name](out, forget, retain, s, g)
    out.eval()
    return out
