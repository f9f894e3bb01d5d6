"""``rum``: memorization-aware approximate unlearning of a shard, with optional routing.

For each stage from the first affected slice on, RUM (``platform.rum``) unlearns the
deleted samples that stage was trained on from its snapshot: the forget set split into
memorization thirds by ``rum.score``, each third unlearnt with its algorithm, the retain
set being the stage's remaining rows. The new versions list only remaining ids and are
marked approximate (``exact=False``).

Scores. The four training proxies are running means over the shard's slice checkpoints
(``memorization.snapshot_proxies``: R forward passes when the request executes, nothing
precomputed); ``holdout_kl`` and ``exact`` are read from the scores stored with the run.

Routing (``rum.route_quantile``): highly memorized samples are where approximate methods
fail, so a request whose samples' mean memorization ranks at or above that quantile of
the shard's rows is retrained exactly instead (SISA's ``retrain_exact``). Samples without
a score (NaN: e.g. the exact estimator never left them out) count as most memorized.
``rum.route_by=random`` sends the same share of requests to exact retraining by a seeded
coin: the control for measuring what memorization adds to routing.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ray_unlearn.platform.core.models import build_model
from ray_unlearn.platform.core.training import StageResult, derive_seed
from ray_unlearn.platform.methods.approximate import ApproxSettings
from ray_unlearn.platform.methods.base import (
    ShardState,
    ShardUpdate,
    UnlearningStrategy,
    affected_rows,
    register_strategy,
)
from ray_unlearn.platform.methods.rum.memorization import (
    PROXIES,
    as_memorization,
    scores_for,
    snapshot_proxies,
)
from ray_unlearn.platform.methods.rum.unlearn import RumPlan, rum_unlearn


@register_strategy
class RumStrategy(UnlearningStrategy):
    name = "rum"
    exact = False
    description = (
        "approximate: memorization-aware RUM (optionally routing memorized samples to exact)"
    )

    def _model(self, state_dict):
        ctx = self.ctx
        m = build_model(ctx.config.model, ctx.feature_shape, ctx.num_classes)
        m.load_state_dict(state_dict)
        return m.eval()

    def scores(self, state: ShardState) -> np.ndarray:
        """``rum.score`` of every row of the shard (raw, not oriented; NaN: none stored)."""
        name, data = self.ctx.config.rum.score, state.data
        if name in PROXIES:
            models = [self._model(s) for s in state.snapshots]
            return snapshot_proxies(models, data.features, data.labels, data.slices)[name]
        return scores_for(self.ctx, name, data.sample_ids)

    def _route_exact(self, mem: np.ndarray, in_shard: np.ndarray, data) -> tuple[bool, float]:
        """(route to exact?, the memorization quantile of the request, or the random coin)."""
        cfg = self.ctx.config.rum
        if cfg.route_by == "random":  # a coin seeded by the run and the request's samples
            ids = np.sort(data.sample_ids[in_shard])
            seed = derive_seed(self.ctx.config.seed, data.shard, len(ids), *ids[:64].tolist())
            coin = float(np.random.default_rng(seed).random())
            return cfg.route_quantile is not None and coin >= cfg.route_quantile, coin
        known = ~np.isnan(mem)
        if not known[in_shard].any():
            rank = 1.0  # nothing known about these samples: treat them as most memorized
        else:
            rank = float((mem[known] < mem[in_shard & known].mean()).mean())
        return cfg.route_quantile is not None and rank >= cfg.route_quantile, rank

    def unlearn_shard(self, state: ShardState, deleted: np.ndarray) -> ShardUpdate:
        t0 = time.perf_counter()
        cfg = self.ctx.config.rum
        data = state.data
        in_shard, first = affected_rows(state, deleted)
        raw = self.scores(state)
        mem = as_memorization(cfg.score, raw)  # higher = more memorized
        to_exact, rank = self._route_exact(mem, in_shard, data)
        key = "coin" if cfg.route_by == "random" else "memorization_quantile"
        info = {"strategy": self.name, "score": cfg.score, "route_by": cfg.route_by,
                key: rank, "first_slice": first}  # fmt: skip
        if to_exact:
            from ray_unlearn.platform.methods.base import retrain_exact

            update = retrain_exact(self.ctx, state, data.sample_ids[in_shard], first)
            update.info = {**info, "decision": "exact",
                           "actual_seconds": time.perf_counter() - t0}  # fmt: skip
            return update
        plan = RumPlan(cfg.score, {"low": cfg.low, "medium": cfg.medium, "high": cfg.high})
        settings = ApproxSettings(epochs=cfg.epochs, lr=cfg.lr, seed=self.ctx.config.seed)
        remaining = data.without(data.sample_ids[in_shard])
        stages = []
        for r in range(first, data.num_slices):
            t1 = time.perf_counter()
            upto = data.slices <= r
            f_rows = np.flatnonzero(in_shard & upto)
            r_rows = np.flatnonzero(~in_shard & upto)
            sel_f, sel_r = torch.from_numpy(f_rows), torch.from_numpy(r_rows)
            model = rum_unlearn(
                self._model(state.snapshots[r]),
                (data.features[sel_f], data.labels[sel_f]),
                (data.features[sel_r], data.labels[sel_r]),
                raw[f_rows],
                plan,
                settings,
            )
            new = {k: v.detach().clone() for k, v in model.state_dict().items()}
            stages.append(
                StageResult(
                    r,
                    new,
                    remaining.ids_through(r),
                    {"exact": 0.0, "seconds": time.perf_counter() - t1},
                )  # fmt: skip
            )
        return ShardUpdate(
            first_stage=first,
            stages=stages,
            exact=False,
            info={**info, "decision": "rum", "actual_seconds": time.perf_counter() - t0},
        )
