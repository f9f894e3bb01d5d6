"""Hybrid exact/approximate unlearning: the workload estimator and the decision.

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

The approximate side's own steps live beside it: OHS fine-tuning in
:mod:`~ray_unlearn.platform.methods.hybrid.finetune`, the forget calibration and the
memorization gap in :mod:`~ray_unlearn.platform.methods.hybrid.calibration`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ray_unlearn.platform.core.config import TrainingConfig
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.training import (
    ShardData,
    _optimizer,
    stage_steps,
)
from ray_unlearn.platform.core.versions import chain_exactness  # noqa: F401  (re-exported)
from ray_unlearn.platform.methods.hybrid.config import HybridConfig

if TYPE_CHECKING:
    from ray_unlearn.platform.core.run import RunContext
    from ray_unlearn.platform.core.versions import Registry


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
