"""Hybrid exact/approximate unlearning: the workload estimator, the decision, OHS fine-tuning.

Estimator. Exact partial retraining of shard k from its first affected slice f runs the
stages f..R-1 of :func:`~ray_unlearn.platform.core.training.train_stage` on the shard's live rows:
stage r takes ``stage_steps(|slice r|, epochs, batch)`` steps over the rows of slices 0..r,
so its samples are known exactly before it runs (:func:`stage_samples`). A batch of
requests costs the sum over its affected shards. Seconds = samples / throughput, where the
throughput (samples per second) is measured from the run's own stage metrics
(``samples_seen`` and ``seconds`` in the live versions' manifests): every exact retrain
adds to it, so the estimate calibrates itself on the machine that runs the unlearning.

Decision. Exact (SISA) when the predicted seconds are <= the threshold, otherwise a direct
parameter update (DPUS); the threshold is in seconds or a fraction of the predicted time
of a full retrain (every shard from slice 0), which does not depend on the machine.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ray_unlearn.platform.core.config import ModelConfig, TrainingConfig
from ray_unlearn.platform.core.models import build_model
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.training import (
    ShardData,
    StateDict,
    _optimizer,
    derive_seed,
    predict_proba,
    snapshot,
    stage_steps,
)
from ray_unlearn.platform.methods.hybrid.config import HybridConfig

if TYPE_CHECKING:
    from ray_unlearn.platform.core.run import RunContext
    from ray_unlearn.platform.core.versions import Registry
    from ray_unlearn.platform.methods.hybrid.contributions import ContributionRecorder

_FINETUNE, _VALIDATION = 0x4F485346, 0x4F485356  # "OHSF", "OHSV"


# -- exact work ------------------------------------------------------------------------------


def stage_samples(n_rows: int, steps: int, batch_size: int) -> int:
    """Samples a stage of ``steps`` batches over ``n_rows`` rows sees (``stage_batches``:
    full passes, each cut into batches, the last batch of a pass possibly short)."""
    if steps <= 0 or n_rows <= 0:
        return 0
    per_pass = math.ceil(n_rows / batch_size)
    passes, rest = divmod(steps, per_pass)
    return passes * n_rows + min(rest * batch_size, n_rows)


def retrain_work(
    slice_sizes, first: int, epochs: int, batch_size: int
) -> tuple[int, int, list[int]]:
    """(steps, samples, steps per stage) of training stages ``first..R-1`` of a shard whose
    live slices hold ``slice_sizes`` rows (exactly what ``train_shard`` will do)."""
    sizes = np.asarray(slice_sizes, dtype=np.int64)
    cum = np.cumsum(sizes)
    steps, samples, per_stage = 0, 0, []
    for r in range(first, len(sizes)):
        n_rows = int(cum[r])
        s = stage_steps(int(sizes[r]), epochs, batch_size) if n_rows else 0
        per_stage.append(s)
        steps += s
        samples += stage_samples(n_rows, s, batch_size)
    return steps, samples, per_stage


@dataclass
class Throughput:
    samples: float  # samples seen by the versions measured
    seconds: float  # their training seconds
    versions: int
    samples_per_second: float  # samples-weighted median of the versions' rates


def _throughput(metrics: list[dict]) -> Throughput:
    rows = [
        (m["samples_seen"], m["seconds"])
        for m in metrics
        if m.get("samples_seen", 0) > 0 and m.get("seconds", 0) > 0
    ]
    if not rows:
        return Throughput(0.0, 0.0, 0, float("nan"))
    samples, seconds = (np.asarray(c, dtype=np.float64) for c in zip(*rows, strict=True))
    rate = samples / seconds
    order = np.argsort(rate)
    cum = np.cumsum(samples[order])
    median = float(rate[order][np.searchsorted(cum, cum[-1] / 2)])
    return Throughput(float(samples.sum()), float(seconds.sum()), len(rows), median)


def measured_throughput(ctx: RunContext, registry: Registry | None = None) -> Throughput:
    """Training samples per second from the stage metrics of the live versions (falling back
    to every version of the run when no live version was trained, e.g. all were updated
    approximately). A samples-weighted median of the versions' rates, so that one slow
    stage (a process's first optimizer step pays torch's lazy imports) does not skew it."""
    store = ctx.model_store
    reg = registry or store.registry()
    t = _throughput([store.manifest(v).get("metrics", {}) for v in reg.live_versions()])
    if t.versions == 0:
        models = ctx.layout.version_dir("").rstrip("/")
        vids = [
            v
            for v in ctx.storage.listdir(models)
            if ctx.storage.exists(ctx.layout.version_manifest(v))
        ]
        t = _throughput([store.manifest(v).get("metrics", {}) for v in vids])
    if t.versions == 0:
        raise ValueError(
            f"run {ctx.run_id} has no trained version with samples_seen and seconds metrics: "
            "no throughput to turn the estimated work into seconds"
        )
    return t


@dataclass
class ShardWorkload:
    shard: int
    first_slice: int
    steps: int
    samples: int
    seconds: float


@dataclass
class WorkloadEstimate:
    """Predicted exact partial retraining of a batch of requests."""

    shards: dict[int, ShardWorkload]
    samples_per_second: float
    full_seconds: float  # every live shard retrained from slice 0 (after the batch)
    full_samples: int = 0

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.shards.values())

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards.values())

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.shards.values())


def _group(ctx: RunContext, ids: np.ndarray) -> dict[int, np.ndarray]:
    if not len(ids):
        return {}
    shards, _ = ctx.plan.locate(ids)
    keep = shards != TEST
    ids, shards = ids[keep], shards[keep]
    return {int(k): ids[shards == k] for k in np.unique(shards)}


def batch_deletions(
    ctx: RunContext, shard: int, deleted
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """The batch a shard's deletion belongs to: ``deleted`` plus every unfinished request in
    the log (the engine executes them together), grouped by shard, minus done deletions.
    Returns (shard -> ids, the done deletions)."""
    log = ctx.deletion_log
    done = np.fromiter(log.deleted_sample_ids(), dtype=np.int64)
    parts = [np.asarray(deleted, dtype=np.int64)]
    parts += [np.asarray(r.request.sample_ids, dtype=np.int64) for r in log.unfinished()]
    ids = np.unique(np.concatenate(parts))
    ids = ids[~np.isin(ids, done)]
    groups = _group(ctx, ids)
    groups[shard] = np.union1d(groups.get(shard, np.zeros(0, np.int64)), deleted)
    return groups, done


def live_slice_sizes(ctx: RunContext, shard: int, exclude) -> tuple[np.ndarray, np.ndarray]:
    """(ids, slices) of a shard's rows minus ``exclude``."""
    ids, slices = ctx.plan.shard_members(shard)
    keep = ~np.isin(ids, np.asarray(exclude, dtype=np.int64))
    return ids[keep], slices[keep]


def estimate_workload(
    ctx: RunContext,
    per_shard: dict[int, np.ndarray],
    *,
    deleted_before=None,
    shard_data: dict[int, ShardData] | None = None,
    samples_per_second: float | None = None,
) -> WorkloadEstimate:
    """Predict exact partial retraining of deleting ``per_shard`` (shard -> sample ids).

    ``deleted_before``: ids already deleted (default: the log's done deletions);
    ``shard_data``: live rows of some shards (used instead of plan minus deleted_before);
    ``samples_per_second``: default :func:`measured_throughput`.
    """
    cfg = ctx.config
    epochs, batch, R = cfg.training.epochs, cfg.training.batch_size, cfg.partition.slices
    if deleted_before is None:
        deleted_before = np.fromiter(ctx.deletion_log.deleted_sample_ids(), dtype=np.int64)
    before = np.asarray(list(deleted_before), dtype=np.int64)
    gone = np.concatenate([before, *per_shard.values()]) if per_shard else before
    sps = samples_per_second or measured_throughput(ctx).samples_per_second
    shard_data = shard_data or {}
    shards, full_samples = {}, 0
    for k in sorted(ctx.model_store.registry().shards):
        if k in shard_data:
            d = shard_data[k]
            keep = ~np.isin(d.sample_ids, gone)
            ids, slices = d.sample_ids[keep], d.slices[keep]
        else:
            ids, slices = live_slice_sizes(ctx, k, gone)
        sizes = np.bincount(slices, minlength=R)
        full_samples += retrain_work(sizes, 0, epochs, batch)[1]
        if k in per_shard and len(per_shard[k]):
            # the first affected slice is where the deleted ids were (in the plan)
            _, hit = ctx.plan.locate(np.asarray(per_shard[k], dtype=np.int64))
            first = int(hit[hit != TEST].min())
            steps, samples, _ = retrain_work(sizes, first, epochs, batch)
            shards[k] = ShardWorkload(k, first, steps, samples, samples / sps)
    return WorkloadEstimate(shards, sps, full_samples / sps, full_samples)


@dataclass
class Decision:
    exact: bool
    predicted_seconds: float  # what the rule compared: the batch's or the shard's
    threshold_seconds: float
    batch_seconds: float
    shard_seconds: float
    full_seconds: float
    samples_per_second: float
    reason: str = "threshold"
    extra: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {
            "hybrid_exact_decision": float(self.exact),
            "hybrid_predicted_seconds": self.predicted_seconds,
            "hybrid_threshold_seconds": self.threshold_seconds,
            "hybrid_batch_predicted_seconds": self.batch_seconds,
            "hybrid_shard_predicted_seconds": self.shard_seconds,
            "hybrid_full_retrain_seconds": self.full_seconds,
            "hybrid_samples_per_second": self.samples_per_second,
            "hybrid_no_contributions": float(self.reason == "no-contributions"),
            **self.extra,
        }


def threshold_seconds(cfg: HybridConfig, estimate: WorkloadEstimate) -> float:
    if cfg.threshold_unit == "seconds":
        return cfg.threshold
    return cfg.threshold * estimate.full_seconds


def decide(cfg: HybridConfig, estimate: WorkloadEstimate, shard: int) -> Decision:
    """HS/OHS rule: exact when the predicted seconds (of the batch, or of ``shard`` when
    ``cfg.scope == 'shard'``) are <= the threshold."""
    own = estimate.shards[shard].seconds if shard in estimate.shards else 0.0
    predicted = estimate.seconds if cfg.scope == "batch" else own
    limit = threshold_seconds(cfg, estimate)
    return Decision(
        predicted <= limit,
        predicted,
        limit,
        estimate.seconds,
        own,
        estimate.full_seconds,
        estimate.samples_per_second,
    )


def optimizer_momentum(train_cfg: TrainingConfig) -> tuple[float, bool]:
    """(momentum of the training optimizer, whether it bias-corrects it): Adam's beta1 with
    bias correction, SGD's heavy-ball momentum without."""
    group = _optimizer(torch.nn.Linear(1, 1), train_cfg).param_groups[0]
    if "betas" in group:
        return float(group["betas"][0]), True
    return float(group.get("momentum", 0.0)), False


# -- lineage ------------------------------------------------------------------------------


def chain_exactness(ctx: RunContext, chain: list[str]) -> list[bool]:
    """Per stage of a live chain: is its snapshot exact (equal to training without every
    deleted sample)? A version's manifest says ``metrics.exact = 0`` when a strategy
    produced it approximately; a snapshot is exact when it and all its ancestors (the
    chain before it) are."""
    out, ok = [], True
    for vid in chain:
        ok = ok and ctx.model_store.manifest(vid).get("metrics", {}).get("exact", 1.0) != 0
        out.append(ok)
    return out


# -- OHS fine-tuning ------------------------------------------------------------------------


def validation_mask(sample_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A fixed pseudo-random ``fraction`` of samples (by id: the same samples every time)."""
    z = np.asarray(sample_ids, dtype=np.int64).astype(np.uint64)
    z = z + np.uint64(derive_seed(seed, _VALIDATION) & 0xFFFFFFFFFFFF)
    with np.errstate(over="ignore"):  # splitmix64 finaliser (wraps modulo 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def finetune_rows(data: ShardData, first: int, which: str) -> np.ndarray:
    """Rows of the OHS fine-tuning subset: the last slice, the affected slices, or all."""
    if which == "last":
        return np.flatnonzero(data.slices == data.num_slices - 1)
    if which == "affected":
        return np.flatnonzero(data.slices >= first)
    if which == "all":
        return np.arange(len(data))
    raise ValueError(f"unknown OHS subset {which!r}; allowed: 'last', 'affected', 'all'")


@dataclass
class FinetuneResult:
    state: StateDict
    steps: int  # steps kept (up to the best validation loss)
    epochs: int  # passes run
    best_epoch: int
    val_before: float
    val_after: float
    train_rows: int
    val_rows: int
    seconds: float = 0.0


@torch.no_grad()
def _loss(model, x, y) -> float:
    model.eval()
    return float(F.cross_entropy(model(x), y)) if len(y) else float("nan")


def finetune(
    state: StateDict,
    data: ShardData,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    *,
    model_cfg: ModelConfig,
    train_cfg: TrainingConfig,
    feature_shape,
    num_classes: int,
    lr: float | None,
    max_epochs: int,
    patience: int,
    seed_parts: tuple[int, ...],
    stage: int,
    recorder: ContributionRecorder | None = None,
) -> FinetuneResult:
    """Fine-tune ``state`` on ``train_rows`` of ``data`` in seeded passes (the run's optimizer,
    batch size and ``lr``) until the loss on ``val_rows`` has not improved for ``patience``
    passes (or ``max_epochs``); returns the weights of the best pass. Each step is given to
    ``recorder`` as a step of ``stage``; the caller keeps the first ``result.steps``."""
    t0 = time.perf_counter()
    model = build_model(model_cfg, feature_shape, num_classes)
    model.load_state_dict(state)
    xv = data.features[torch.from_numpy(val_rows)]
    yv = data.labels[torch.from_numpy(val_rows)]
    best = _loss(model, xv, yv)
    before, best_state, best_epoch, best_steps = best, state, 0, 0
    if not len(train_rows) or not len(val_rows) or max_epochs == 0:
        n_train, n_val = len(train_rows), len(val_rows)
        return FinetuneResult(state, 0, 0, 0, before, best, n_train, n_val, 0.0)
    cfg = train_cfg.model_copy(update={"lr": lr or train_cfg.lr})
    opt = _optimizer(model, cfg)
    params = dict(model.named_parameters())
    steps, bad, epoch = 0, 0, 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        rng = np.random.default_rng(derive_seed(*seed_parts, epoch, _FINETUNE))
        perm = train_rows[rng.permutation(len(train_rows))]
        for i in range(0, len(perm), cfg.batch_size):
            rows = perm[i : i + cfg.batch_size]
            idx = torch.from_numpy(rows)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(data.features[idx]), data.labels[idx]).backward()
            if recorder is None:
                opt.step()
            else:
                prev = {k: p.detach().clone() for k, p in params.items()}
                opt.step()
                after = {k: p.detach() for k, p in params.items()}
                recorder(stage, steps, data.sample_ids[rows], prev, after)
            steps += 1
        val = _loss(model, xv, yv)
        if val < best:
            best, best_state, best_epoch, best_steps, bad = val, snapshot(model), epoch, steps, 0
        else:
            bad += 1
            if bad >= patience:
                break
    return FinetuneResult(
        best_state,
        best_steps,
        epoch,
        best_epoch,
        before,
        best,
        len(train_rows),
        len(val_rows),
        time.perf_counter() - t0,
    )


# -- forget calibration ----------------------------------------------------------------------

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
    if params not in ("all", "body", "head"):
        raise ValueError(f"unknown calibration params {params!r}; allowed: all, body, head")
    if params != "all":  # the models' two parts (platform/core/models.py): body, head
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(params + "."))
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
