"""Exact SISA unlearning: restore the snapshot before the first affected slice, retrain on.

Because training is a deterministic function of (data, seed) (see platform/core/training.py),
the result equals the shard trained from scratch without the deleted samples, provided the
snapshot it restarts from is exact (it is, unless an approximate strategy made it: then the
update says ``exact=False`` and so does every version it creates).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray_unlearn.platform.methods.base import (
    ShardState,
    ShardUpdate,
    UnlearningStrategy,
    affected_rows,
    register_strategy,
    retrain_exact,
)
from ray_unlearn.platform.methods.registry import Method, register

if TYPE_CHECKING:  # annotations only: no numpy import when a config is validated
    import numpy as np


@register_strategy
class SisaRetrain(UnlearningStrategy):
    name = "sisa"
    exact = True
    description = "exact: retrain the affected shard from its first affected slice"

    def unlearn_shard(self, state: ShardState, deleted: np.ndarray) -> ShardUpdate:
        data = state.data
        in_shard, first = affected_rows(state, deleted)
        # retrain_exact carries exactness through the chain (retraining from a snapshot an
        # approximate strategy produced is not exact). Plain SISA records no contributions
        # (it never subtracts any): a later DPUS on these versions falls back to exact.
        update = retrain_exact(self.ctx, state, data.sample_ids[in_shard], first, record=False)
        update.info = {"strategy": self.name, "decision": "exact", "first_slice": first}
        return update


register(Method("sisa", description=SisaRetrain.description, strategies=(SisaRetrain,)))
