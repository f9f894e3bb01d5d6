"""Approximate and hybrid unlearning: DPUS, HS and OHS (see platform/methods/hybrid/workload.py).

``dpus``  Direct parameter update: subtract the recorded updates of the batches that held a
          revoked sample (platform/methods/hybrid/contributions.py) from the shard's snapshots. Never exact.
``hs``    Hybrid: exact SISA retraining when the predicted retraining time of the batch of
          requests is at most ``hybrid.threshold``, DPUS otherwise.
``ohs``   Optimized hybrid: like ``hs``, and after DPUS the serving model is fine-tuned on a
          subset of the shard's remaining slices until a held-out part of the remaining
          rows stops improving.

What DPUS subtracts (``hybrid.dpus_scale``, ``hybrid.dpus_share_factor``,
``hybrid.dpus_momentum``). ``batch`` (the paper's DPUS): each touched step's whole update;
``share``: ``f * d / |batch|`` of it (``d`` revoked samples in the batch, ``f`` the share
factor, capped at the whole update). Two removals from the same batch in different
requests take their shares of what is left (``f * d2 / (|batch| - d1)`` of
``(1 - f * d1 / |batch|)`` of the update). With ``dpus_momentum`` the batch's *gradient*
is removed from this and the later steps it reached through the optimizer's momentum
(Adam, SGD 0.9), instead of the step's raw update.

OHS fine-tuning (``hybrid.ohs_slices``, ``ohs_lr``, ``ohs_max_epochs``): a fresh optimizer
at ``ohs_lr`` on the remaining rows of the affected slices (``affected``), the newest slice
(``last``) or all; a fixed ``ohs_validation_fraction`` of the shard's remaining rows (by a
hash of the sample id) is held out from the fine-tuning and the pass with its lowest loss
is kept. The test split is never used.

What the stage snapshots mean after DPUS. Stage r's snapshot is a restart point for later
exact retrains from slice r + 1, and every stage from the first affected slice f on was
trained on the revoked samples (stage r trains on slices 0..r). So DPUS corrects *every*
stage f..R-1, not only the serving one: ``W'_r = W_r - sum_{s=f..r} removed_s``. Stages
before f never saw the samples and are kept. Each corrected version is written with its
contributions minus every step whose batch held a revoked sample (those updates were
computed on the revoked rows: they leave the stored files whole), so a later DPUS never
subtracts an update twice. With ``share`` the retained part of such a step stays in the
weights unrecorded (``W'_r = W'_{r-1} + sum(contributions_r)`` plus that part): its other
samples are listed as untracked, and a later request for one of them retrains exactly
(``hs``/``ohs``) or is refused (``dpus``). OHS fine-tunes only the serving stage
(its steps are recorded as further contributions of that stage, so a later deletion of a
fine-tuning sample removes them too); the restart points keep the DPUS weights, and a later
exact retrain of the shard discards the fine-tuning with the stages it replaces.

Forget calibration (``hybrid.calibrate_forget``) raises each revoked row's loss to a
target drawn from the losses of non-members (training rows of the other shards), on the
``calibrate_depth`` newest corrected snapshots, moving ``calibrate_params`` at
``calibrate_lr`` until ``calibrate_fraction`` of the shortfall is closed; each calibration
is recorded as one step with no sample ids. Memorization-aware routing
(``hybrid.route_gap``) retrains exactly where the revoked rows' true-class probability on
the shard's model exceeds the other shards' models' by more than the setting.

Why these settings, the measured figures (speed-up over SISA, accuracy, membership attack,
cost) with their commands, and the alternatives tried: docs/methods/hybrid.md.

Exactness. The new versions' sample lists omit the revoked ids (their recorded influence
is removed, so the audit must not report them as contained), and their metrics say
``exact: 0``. An exact retrain restarting from an approximate snapshot is approximate too:
a snapshot is exact only when its whole chain is (:func:`chain_exactness`), and an update's
``exact`` flag says so. Retraining from a slice at or before the first approximate stage
makes the shard exact again.

Contributions of the new versions are written by the strategy, before the runtime persists
the versions, under the version ids they will get (generation + 1); they carry the digest of
the weights they lead to, so files from an attempt that was not published are never used.

What is recorded per request: the serving stage's metrics (persisted in its manifest) hold
``hybrid_exact_decision``, ``hybrid_predicted_seconds``, ``hybrid_threshold_seconds``,
``hybrid_actual_seconds`` (and the batch/shard predictions, throughput, first slice, DPUS and
fine-tuning counts); the same summary is set as ``update.info`` for the deletion log once
:class:`ShardUpdate` carries it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ray_unlearn.platform.core.training import StageResult
from ray_unlearn.platform.core.versions import version_id
from ray_unlearn.platform.methods.base import (
    ShardState,
    ShardUpdate,
    UnlearningStrategy,
    register_strategy,
)
from ray_unlearn.platform.methods.base import retrain_exact as base_retrain_exact
from ray_unlearn.platform.methods.hybrid.calibration import (
    calibrate_forget,
    memorization_gap,
    nonmember_reference,
    teacher_probabilities,
    teacher_shards,
)
from ray_unlearn.platform.methods.hybrid.contributions import (
    ContributionRecorder,
    MissingContributions,
    StageContributions,
    load_contributions,
    save_contributions,
    state_digest,
)
from ray_unlearn.platform.methods.hybrid.finetune import finetune, finetune_rows, validation_mask
from ray_unlearn.platform.methods.hybrid.workload import (
    Decision,
    batch_deletions,
    decide,
    estimate_workload,
    optimizer_momentum,
)


def _generation(vid: str) -> int:
    return int(vid.rsplit("-g", 1)[1])


def retrain_exact(ctx, state: ShardState, deleted: np.ndarray, first: int) -> ShardUpdate:
    """Exact SISA retraining (:func:`~ray_unlearn.platform.methods.base.retrain_exact`),
    recording contributions of the new versions when the run records (``hybrid.record``)."""
    return base_retrain_exact(ctx, state, deleted, first, record=True)


class HybridBase(UnlearningStrategy):
    """Shared machinery; subclasses choose with :meth:`choose`."""

    exact = False  # class level: not guaranteed; each ShardUpdate says what happened
    finetunes = False

    # -- entry point -------------------------------------------------------------------
    def unlearn_shard(self, state: ShardState, deleted: np.ndarray) -> ShardUpdate:
        t0 = time.perf_counter()
        data = state.data
        deleted = np.asarray(deleted, dtype=np.int64)
        in_shard = np.isin(data.sample_ids, deleted)
        if not in_shard.any():
            raise ValueError(
                f"none of the deleted samples {deleted[:5].tolist()} is live in shard {data.shard}"
            )
        deleted = data.sample_ids[in_shard]
        first = int(data.slices[in_shard].min())
        decision = self.decision(state, deleted)
        exact = decision.exact
        if not exact:
            try:
                update = self._approximate(state, deleted, first)
            except MissingContributions:
                if self.name == "dpus":
                    raise
                decision.reason, exact = "no-contributions", True
        if exact:
            update = self._exact(state, deleted, first)
        metrics = update.stages[-1].metrics
        metrics.update(decision.metrics())
        metrics["hybrid_actual_seconds"] = time.perf_counter() - t0
        metrics["hybrid_first_slice"] = float(first)
        metrics["hybrid_deleted"] = float(len(deleted))
        update.info = {  # into the deletion log's details
            "strategy": self.name,
            "decision": "exact" if exact else "dpus",
            "reason": decision.reason,
            "predicted_seconds": decision.predicted_seconds,
            "shard_predicted_seconds": decision.shard_seconds,
            "threshold_seconds": decision.threshold_seconds,
            "actual_seconds": metrics["hybrid_actual_seconds"],
            # what the estimator predicts: the training seconds of the exact retrain
            "retrain_seconds": sum(st.metrics.get("seconds", 0.0) for st in update.stages)
            if exact
            else None,
            "first_slice": first,
            "exact": update.exact,
        }
        return update

    def decision(self, state: ShardState, deleted: np.ndarray) -> Decision:
        ctx, cfg = self.ctx, self.ctx.config.hybrid
        k = state.data.shard
        if cfg.scope == "batch":
            per_shard, done = batch_deletions(ctx, k, deleted)
        else:
            per_shard = {k: deleted}
            done = np.fromiter(ctx.deletion_log.deleted_sample_ids(), dtype=np.int64)
        est = estimate_workload(ctx, per_shard, deleted_before=done, shard_data={k: state.data})
        decision = self.choose(decide(cfg, est, k))
        if not decision.exact and cfg.route_gap is not None and self.name != "dpus":
            gap = memorization_gap(
                ctx,
                state.snapshots[-1],
                state.data,
                deleted,
                exclude_ids=self._requested_ids(deleted),
            )
            decision.extra.update(gap.metrics())
            if gap.gap > cfg.route_gap:  # nan (no teacher) never routes
                decision.exact, decision.reason = True, "memorized"
        return decision

    def choose(self, decision: Decision) -> Decision:
        return decision

    # -- exact ---------------------------------------------------------------------------
    def _exact(self, state: ShardState, deleted: np.ndarray, first: int) -> ShardUpdate:
        return retrain_exact(self.ctx, state, deleted, first)

    # -- approximate ---------------------------------------------------------------------
    def _approximate(self, state: ShardState, deleted: np.ndarray, first: int) -> ShardUpdate:
        ctx, cfg = self.ctx, self.ctx.config
        hy = cfg.hybrid
        data = state.data
        remaining = data.without(deleted)
        R = data.num_slices
        beta, bias_correction = optimizer_momentum(cfg.training) if hy.dpus_momentum else (0, 0)
        stages, kept, cum = [], [], None
        for r in range(first, R):
            t0 = time.perf_counter()
            # loaded one stage at a time: a request whose rows an earlier DPUS left
            # untracked (MissingContributions, HS then retrains exactly) fails at the first
            # such stage, before the later stages are read and their digests checked
            c = load_contributions(
                ctx.storage, ctx.layout, state.chain[r], expect=state.snapshots[r]
            )
            removed, rest, touched = c.without(
                deleted,
                hy.dpus_scale,
                factor=hy.dpus_share_factor,
                momentum=beta,
                bias_correction=bool(bias_correction),
            )
            cum = removed if cum is None else {k: cum[k] + removed[k] for k in cum}
            snap = state.snapshots[r]
            new = {  # buffers (no recorded update) are kept
                k: (snap[k].float() - cum[k]).to(snap[k].dtype) if k in cum else snap[k]
                for k in snap
            }
            metrics = {
                "exact": 0.0,
                "dpus_removed_steps": float(touched),
                "dpus_kept_steps": float(rest.steps),
                "dpus_seconds": time.perf_counter() - t0,
            }
            stages.append(StageResult(r, new, remaining.ids_through(r), metrics))
            kept.append(rest)
        if self.finetunes:
            self._finetune(state, remaining, first, stages[-1], kept)
        if hy.calibrate_forget:
            self._calibrate(state, deleted, stages, kept)
        gen = _generation(state.chain[-1]) + 1
        for st, rest in zip(stages, kept, strict=True):
            rest.digest = state_digest(st.state)
            vid = version_id(data.shard, st.stage, gen)
            save_contributions(ctx.storage, ctx.layout, vid, rest)
        return ShardUpdate(first_stage=first, stages=stages, exact=False)

    def _requested_ids(self, deleted: np.ndarray) -> np.ndarray:
        """Every id any request names (this batch's other shards too, and pending ones),
        with ``deleted``: rows no reference row or stand-in model may hold."""
        named = self.ctx.deletion_log.requested_sample_ids()
        return np.union1d(np.fromiter(named, dtype=np.int64, count=len(named)), deleted)

    def _model_args(self) -> dict:
        """What the fine-tuning and calibration loops need to rebuild the shard's model."""
        ctx = self.ctx
        return {
            "model_cfg": ctx.config.model,
            "train_cfg": ctx.config.training,
            "feature_shape": ctx.feature_shape,
            "num_classes": ctx.num_classes,
        }

    def _finetune(
        self,
        state: ShardState,
        remaining,
        first: int,
        serving: StageResult,
        kept: list[StageContributions],
    ) -> None:
        """OHS: fine-tune the serving snapshot in place (``serving``, ``kept[-1]``)."""
        cfg = self.ctx.config
        hy = cfg.hybrid
        val = validation_mask(remaining.sample_ids, hy.ohs_validation_fraction, cfg.seed)
        train_rows = finetune_rows(remaining, first, hy.ohs_slices)
        train_rows = train_rows[~val[train_rows]]
        val_rows = np.flatnonzero(val)
        rec = ContributionRecorder(hy.dtype)
        gen = _generation(state.chain[-1]) + 1
        res = finetune(
            serving.state,
            remaining,
            train_rows,
            val_rows,
            **self._model_args(),
            lr=hy.ohs_lr,
            max_epochs=hy.ohs_max_epochs,
            patience=hy.ohs_patience,
            seed_parts=(cfg.seed, remaining.shard, gen),
            stage=serving.stage,
            recorder=rec,
        )
        if res.steps:
            rec.set_parameters(serving.state)
            ft = rec.take(serving.stage)
            ft = ft.head(res.steps)
            kept[-1] = kept[-1].extended(ft)
        serving.state = res.state
        serving.metrics.update(
            ohs_finetune_steps=float(res.steps),
            ohs_finetune_epochs=float(res.epochs),
            ohs_finetune_best_epoch=float(res.best_epoch),
            ohs_finetune_rows=float(res.train_rows),
            ohs_validation_rows=float(res.val_rows),
            ohs_val_loss_before=res.val_before,
            ohs_val_loss_after=res.val_after,
            ohs_finetune_seconds=res.seconds,
        )

    def _calibrate(
        self,
        state: ShardState,
        deleted: np.ndarray,
        stages: list[StageResult],
        kept: list[StageContributions],
    ) -> None:
        """Forget calibration of the ``calibrate_depth`` newest corrected snapshots (all when
        None), in place.

        The restart points are calibrated too: an exact retrain that later restarts from
        one would otherwise bring back what calibrating only the serving stage removed. Each
        snapshot is calibrated from its own DPUS weights, independently: carrying a stage's
        change into the later ones compounds (the serving model, pushed once per corrected
        stage, ends far *less* sure of the revoked rows than a retrained one, and loses
        accuracy). The chain still adds up: stage r records one step with no ids, its own
        change minus stage r-1's, so ``W'_r = W'_{r-1} + sum(contributions_r)``."""
        ctx, cfg = self.ctx, self.ctx.config
        hy = cfg.hybrid
        data = state.data
        gone = np.isin(data.sample_ids, deleted)
        # every id any request names (this batch's other shards too, and pending ones)
        every_deleted = self._requested_ids(deleted)
        reference = nonmember_reference(
            ctx, data.shard, every_deleted, hy.calibrate_reference_rows, cfg.seed
        )
        teachers = (
            teacher_shards(ctx, data.shard, deleted) if hy.calibrate_target == "teacher" else []
        )
        registry = ctx.model_store.registry() if teachers else None
        gen = _generation(state.chain[-1]) + 1
        before: dict | None = None  # the previous stage's calibration change
        for i, st in enumerate(stages):
            if hy.calibrate_depth is not None and i < len(stages) - hy.calibrate_depth:
                continue
            forget = np.flatnonzero(gone & (data.slices <= st.stage))
            teacher, n_teachers = None, 0
            if teachers and len(forget):
                teacher, n_teachers = teacher_probabilities(
                    ctx,
                    teachers,
                    st.stage,
                    data.features[torch.from_numpy(forget)],
                    registry=registry,
                    exclude_ids=every_deleted,
                )
            res = calibrate_forget(
                st.state,
                data,
                forget,
                np.flatnonzero(~gone & (data.slices <= st.stage)),
                reference,
                **self._model_args(),
                lr=hy.calibrate_lr,
                max_steps=hy.calibrate_max_steps,
                seed_parts=(cfg.seed, data.shard, gen, st.stage),
                batch_size=hy.calibrate_batch_size,
                fraction=hy.calibrate_fraction,
                teacher=teacher,
                params=hy.calibrate_params,
            )
            keys = list(kept[i].deltas)
            own = (
                {k: res.state[k].float() - st.state[k].float() for k in keys} if res.steps else None
            )
            if own is not None or before is not None:  # one recorded step, no ids
                zero = {k: torch.zeros_like(st.state[k], dtype=torch.float32) for k in keys}
                net = {
                    k: (own or zero)[k] - (before or zero)[k] for k in keys
                }  # fmt: skip
                rec = ContributionRecorder(hy.dtype)
                rec(st.stage, 0, np.empty(0, dtype=np.int64), zero, net)
                kept[i] = kept[i].extended(rec.take(st.stage))
            before = own
            st.state = res.state
            st.metrics.update(
                calibrate_steps=float(res.steps),
                calibrate_forget_loss_before=res.forget_loss_before,
                calibrate_forget_loss_after=res.forget_loss_after,
                calibrate_target_loss=res.target_loss,
                calibrate_reached=float(res.reached),
                calibrate_teachers=float(n_teachers),
                calibrate_seconds=res.seconds,
            )


@register_strategy
class Dpus(HybridBase):
    name = "dpus"
    description = "approximate: subtract the recorded updates of the revoked samples' batches"

    def choose(self, decision: Decision) -> Decision:
        decision.exact = False
        return decision


@register_strategy
class HybridStrategy(HybridBase):
    name = "hs"
    description = "hybrid: exact SISA when the predicted retraining is light, else DPUS"


@register_strategy
class OptimizedHybrid(HybridBase):
    name = "ohs"
    finetunes = True
    description = "hybrid: exact SISA when light, else DPUS + fine-tuning to convergence"
