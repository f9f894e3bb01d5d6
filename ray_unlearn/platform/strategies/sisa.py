"""Exact SISA unlearning: restore the snapshot before the first affected slice, retrain on.

Because training is a deterministic function of (data, seed) (see platform/training.py),
the result equals the shard trained from scratch without the deleted samples.
"""

from __future__ import annotations

import numpy as np

from ray_unlearn.platform.strategies.base import (
    ShardState,
    ShardUpdate,
    UnlearningStrategy,
    register_strategy,
)
from ray_unlearn.platform.training import train_shard


@register_strategy
class SisaRetrain(UnlearningStrategy):
    name = "sisa"
    exact = True
    description = "exact: retrain the affected shard from its first affected slice"

    def unlearn_shard(self, state: ShardState, deleted: np.ndarray) -> ShardUpdate:
        data = state.data
        in_shard = np.isin(data.sample_ids, deleted)
        if not in_shard.any():
            raise ValueError(
                f"none of the deleted samples {deleted[:5].tolist()} is live in shard {data.shard}"
            )
        first = int(data.slices[in_shard].min())
        remaining = data.without(deleted)
        cfg = self.ctx.config
        stages = train_shard(
            remaining,
            cfg.model,
            cfg.training,
            seed=cfg.seed,
            feature_shape=self.ctx.feature_shape,
            num_classes=self.ctx.num_classes,
            start_stage=first,
            start_state=state.snapshots[first - 1] if first > 0 else None,
        )
        return ShardUpdate(first_stage=first, stages=stages, exact=True)
