"""Forget calibration: after an approximate update, the revoked rows are pushed to the loss
that models which never saw them give (the other shards' models as teachers, or a
non-member reference of other shards' rows), and the memorization gap that measures what
is left of them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ray_unlearn.platform.core.config import ModelConfig, TrainingConfig
from ray_unlearn.platform.core.models import build_model, calibration_parameter_names
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.training import (
    ShardData,
    StateDict,
    _optimizer,
    derive_seed,
    predict_proba,
    snapshot,
)
from ray_unlearn.platform.methods.hybrid.finetune import validation_mask

if TYPE_CHECKING:
    from ray_unlearn.platform.core.run import RunContext
    from ray_unlearn.platform.core.versions import Registry

_CALIBRATE, _REFERENCE = 0x43414C49, 0x43414C52  # "CALI", "CALR"


def nonmember_reference(
    ctx: RunContext, shard: int, exclude: np.ndarray, rows: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of up to ``rows`` training rows of the *other* shards (never
    seen by ``shard``'s model: its non-members, from the data it was trained on), minus the
    ``exclude`` ids (every deleted sample). A fixed choice by sample id; no held-out row."""
    plan = ctx.plan
    ids = plan.sample_ids[(plan.shards != TEST) & (plan.shards != shard)]
    ids = ids[~np.isin(ids, np.asarray(exclude, dtype=np.int64))]
    if len(ids) > rows:
        ids = ids[validation_mask(ids, rows / len(ids), derive_seed(seed, _REFERENCE))]
    pos = ctx.records.index_of(ctx.present(ids))
    x = torch.from_numpy(np.ascontiguousarray(ctx.records.features[pos]))
    y = torch.from_numpy(ctx.records.labels[pos].astype(np.int64))
    return x, y


def teacher_shards(ctx: RunContext, shard: int, forget_ids) -> list[int]:
    """The shards whose models may stand in for ``shard``'s model retrained without
    ``forget_ids``: every other shard that holds (in the plan, live or deleted) no sample of
    any owner of those rows. With owner-grouped plans that is every other shard; with
    sample-grouped ones a shard that trained on the same person's other rows is left out."""
    plan = ctx.plan
    owners = np.unique(plan.owner_ids[plan.positions(forget_ids)])
    related = np.isin(plan.owner_ids, owners)
    taken = set(np.unique(plan.shards[related]).tolist())
    return [k for k in range(plan.num_shards) if k != shard and k not in taken]


@torch.no_grad()
def teacher_probabilities(
    ctx: RunContext,
    shards: list[int],
    stage: int,
    x: torch.Tensor,
    *,
    registry: Registry | None = None,
    exclude_ids=None,
) -> tuple[torch.Tensor | None, int]:
    """Mean class probabilities on ``x`` of the ``shards``' live stage-``stage`` models (the
    same amount of training as the snapshot being calibrated), and how many models that is;
    (None, 0) when none qualifies. A version trained on any of ``exclude_ids`` (every sample
    a request names: what it knows of them must not pass into another model) is skipped."""
    reg = registry or ctx.model_store.registry()
    model = build_model(ctx.config.model, ctx.feature_shape, ctx.num_classes)
    total, n = None, 0
    for k in shards:
        entry = reg.shards.get(k)
        if entry is None or entry.empty or len(entry.chain) <= stage:
            continue
        vid = entry.chain[stage]
        if exclude_ids is not None and np.isin(ctx.model_store.sample_ids(vid), exclude_ids).any():
            continue
        model.load_state_dict(ctx.model_store.load_state(vid))
        p = predict_proba(model, x)
        total = p if total is None else total + p
        n += 1
    return (None, 0) if total is None else (total / n, n)


@dataclass
class MemorizationGap:
    """How much better a shard's serving model fits the revoked rows than models that never
    saw them (:func:`memorization_gap`)."""

    gap: float  # shard - teachers, mean true-class probability (nan: no teacher)
    shard_probability: float
    teacher_probability: float
    teachers: int
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {
            "hybrid_memorization_gap": self.gap,
            "hybrid_shard_probability": self.shard_probability,
            "hybrid_teacher_probability": self.teacher_probability,
            "hybrid_gap_teachers": float(self.teachers),
            "hybrid_gap_seconds": self.seconds,
        }


@torch.no_grad()
def memorization_gap(
    ctx: RunContext,
    serving: StateDict,
    data: ShardData,
    deleted: np.ndarray,
    *,
    exclude_ids=None,
    registry: Registry | None = None,
) -> MemorizationGap:
    """The revoked rows' (``deleted`` of ``data``) mean true-class probability on the shard's
    ``serving`` weights, minus the same on the other shards' serving models that qualify as
    stand-ins for a model retrained without them (:func:`teacher_shards`; none trained on
    any of ``exclude_ids``): the membership signal an approximate update would have to
    remove. Forward passes on the revoked rows only."""
    t0 = time.perf_counter()
    rows = torch.from_numpy(np.flatnonzero(np.isin(data.sample_ids, deleted)))
    x, y = data.features[rows], data.labels[rows]
    model = build_model(ctx.config.model, ctx.feature_shape, ctx.num_classes)
    model.load_state_dict(serving)
    at = torch.arange(len(y))
    own = float(predict_proba(model, x)[at, y].mean()) if len(y) else float("nan")
    probs, n = teacher_probabilities(
        ctx,
        teacher_shards(ctx, data.shard, data.sample_ids[rows.numpy()]),
        data.num_slices - 1,
        x,
        registry=registry,
        exclude_ids=exclude_ids,
    )
    others = float(probs[at, y].mean()) if probs is not None and len(y) else float("nan")
    return MemorizationGap(own - others, own, others, n, time.perf_counter() - t0)


@torch.no_grad()
def _per_sample_loss(model, x, y) -> torch.Tensor:
    model.eval()
    return F.cross_entropy(model(x), y, reduction="none")


def quantile_targets(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per forget row, the reference loss at the quantile its rank among the forget rows
    takes ((i + 0.5) / n, ranks by current loss): ``n`` rows that look like ``n`` draws of
    non-members, in the order the model already sees them (the easiest stays the easiest)."""
    n = len(current)
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    levels = torch.quantile(reference.double(), q).float()
    out = torch.empty_like(current)
    out[torch.argsort(current)] = levels
    return out


@dataclass
class CalibrationResult:
    state: StateDict
    steps: int
    forget_loss_before: float
    forget_loss_after: float
    target_loss: float
    reached: bool
    seconds: float = 0.0


def calibrate_forget(
    state: StateDict,
    data: ShardData,
    forget_rows: np.ndarray,
    retain_rows: np.ndarray,
    reference: tuple[torch.Tensor, torch.Tensor],
    *,
    model_cfg: ModelConfig,
    train_cfg: TrainingConfig,
    feature_shape,
    num_classes: int,
    lr: float | None,
    max_steps: int,
    seed_parts: tuple[int, ...],
    batch_size: int | None = None,
    fraction: float = 1.0,
    teacher: torch.Tensor | None = None,
    params: str = "all",
) -> CalibrationResult:
    """Raise the loss of the revoked rows (``forget_rows`` of ``data``) to what the model
    gives rows it never saw (``reference``), without hurting the rest.

    After a direct parameter update the revoked rows are still fitted better than unseen
    rows (their influence on later steps is not removed), which is what a membership attack
    sees. Each revoked row gets a target loss (:func:`quantile_targets` of the reference
    losses); each step takes a retain batch's loss minus the mean of the revoked rows'
    losses *capped at their targets* (a row at its target gets no more push), until every
    row is at its target (or, with ``fraction`` < 1, until that share of the total shortfall
    below the targets is closed) or ``max_steps``. The steps are not recorded one by one:
    each holds a gradient of the revoked rows, so the caller records the whole change as one
    step with no sample ids (nothing a later deletion could take back, nothing of the
    revoked rows beyond what the weights show).

    With ``teacher`` (per revoked row, the class probabilities of models that never saw
    it: :func:`teacher_probabilities` of the other shards), each row's target is the
    teacher's loss on its label, and the push is a descent on the cross-entropy to the
    teacher's whole distribution rather than an ascent on the label's loss: the row is
    moved to what a model trained without it predicts (including which wrong class it
    leans to), not just made less likely. ``reference`` is then unused."""
    t0 = time.perf_counter()
    model = build_model(model_cfg, feature_shape, num_classes)
    model.load_state_dict(state)
    fidx = torch.from_numpy(np.asarray(forget_rows, dtype=np.int64))
    xf, yf = data.features[fidx], data.labels[fidx]
    ref_x, ref_y = reference
    current = _per_sample_loss(model, xf, yf)
    before = float(current.mean()) if len(current) else float("nan")
    no_reference = teacher is None and not len(ref_y)
    if not len(forget_rows) or no_reference or not len(retain_rows) or max_steps == 0:
        return CalibrationResult(state, 0, before, before, float("nan"), False)
    if teacher is not None:
        if teacher.shape != (len(forget_rows), num_classes):
            raise ValueError(
                f"teacher probabilities have shape {tuple(teacher.shape)}; expected one row "
                f"of {num_classes} class probabilities per revoked row ({len(forget_rows)})"
            )
        soft = teacher.float().clamp_min(1e-12)
        soft = soft / soft.sum(1, keepdim=True)
        targets = -torch.log(soft[torch.arange(len(yf)), yf])
    else:
        targets = quantile_targets(current, _per_sample_loss(model, ref_x, ref_y))
    cfg = train_cfg.model_copy(
        update={"lr": lr or train_cfg.lr, "batch_size": batch_size or train_cfg.batch_size}
    )
    if params != "all":  # the parts named by model.parts (built-ins: body.*, head.*)
        movable = set(calibration_parameter_names(model, params))
        for name, p in model.named_parameters():
            p.requires_grad_(name in movable)
    opt = _optimizer(model, cfg)
    rng = np.random.default_rng(derive_seed(*seed_parts, _CALIBRATE))
    steps = 0
    short0 = float((targets - torch.minimum(current, targets)).sum())

    def open_gap(cur: torch.Tensor) -> bool:
        short = float((targets - torch.minimum(cur, targets)).sum())
        return bool((cur < targets).any()) and short > (1.0 - fraction) * short0

    n_forget = len(yf)
    model.train()
    while steps < max_steps:
        pick = rng.choice(len(retain_rows), min(cfg.batch_size, len(retain_rows)), replace=False)
        ridx = torch.from_numpy(retain_rows[pick])
        opt.zero_grad(set_to_none=True)
        # one pass over the revoked rows and the retain batch (the model has no batch
        # statistics: each row's output is its own); the revoked rows' part is also the
        # check of the stopping rule on the current weights
        logits = model(torch.cat([xf, data.features[ridx]]))
        forget_logits = logits[:n_forget]
        current = F.cross_entropy(forget_logits.detach(), yf, reduction="none")
        if not open_gap(current):
            break
        if teacher is not None:  # minimise: toward the teacher's distribution
            push = -(soft * F.log_softmax(forget_logits, dim=1)).sum(1).mean()
        else:  # maximise the label's loss, each row capped at its target
            push = -torch.minimum(
                F.cross_entropy(forget_logits, yf, reduction="none"), targets
            ).mean()
        (F.cross_entropy(logits[n_forget:], data.labels[ridx]) + push).backward()
        opt.step()
        steps += 1
    else:  # stopped by max_steps: the rows as the last step left them
        current = _per_sample_loss(model, xf, yf)
    return CalibrationResult(
        snapshot(model),
        steps,
        before,
        float(current.mean()),
        float(targets.mean()),
        not open_gap(current),
        time.perf_counter() - t0,
    )
