"""``rum``: memorization-aware approximate unlearning of a shard, with optional routing.

For each stage from the first affected slice on, RUM (``platform.rum``) unlearns the
deleted samples that stage was trained on from its snapshot: the forget set split into
memorization thirds by ``rum.score`` read from the shard's current model, each third
unlearnt with its algorithm, the retain set being the stage's remaining rows. The new
versions list only remaining ids and are marked approximate (``exact=False``).

Routing (``rum.route_quantile``): highly memorized samples are where approximate methods
fail, so a request whose samples' mean memorization ranks at or above that quantile of
the shard's rows is retrained exactly instead (SISA's ``retrain_exact``).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ray_unlearn.platform.approximate import ApproxSettings
from ray_unlearn.platform.memorization import as_memorization, probabilities, proxy_scores
from ray_unlearn.platform.models import build_model
from ray_unlearn.platform.rum import RumPlan, rum_unlearn
from ray_unlearn.platform.strategies.base import (
    ShardState,
    ShardUpdate,
    UnlearningStrategy,
    affected_rows,
    register_strategy,
)
from ray_unlearn.platform.training import StageResult


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

    def unlearn_shard(self, state: ShardState, deleted: np.ndarray) -> ShardUpdate:
        t0 = time.perf_counter()
        cfg = self.ctx.config.rum
        data = state.data
        in_shard, first = affected_rows(state, deleted)
        serving = self._model(state.snapshots[-1])
        raw = proxy_scores(probabilities(serving, data.features), data.labels)[cfg.score]
        mem = as_memorization(cfg.score, raw)  # higher = more memorized
        rank = float((mem < mem[in_shard].mean()).mean())  # quantile of the request's mean
        info = {"strategy": self.name, "score": cfg.score, "memorization_quantile": rank,
                "first_slice": first}  # fmt: skip
        if cfg.route_quantile is not None and rank >= cfg.route_quantile:
            from ray_unlearn.platform.strategies.hybrid import retrain_exact

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
