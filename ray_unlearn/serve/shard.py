"""Shard deployments: one per shard, computing that shard's class probabilities.

The gateway names the model version it wants with every call, so a version swap needs no
broadcast and no restart: a replica that sees a new version id loads its weights from the
store (milliseconds) and answers with it. Calls already in flight keep the version they
named, from a small cache, so a swap never fails or drops a request.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from ray import serve

from ray_unlearn.platform.core.device import usable_device
from ray_unlearn.platform.core.run import open_run
from ray_unlearn.platform.core.runtime import load_serving_model
from ray_unlearn.platform.core.training import configure_threads, predict_proba
from ray_unlearn.train.session import declare_worker_gpus

_CACHED_VERSIONS = 3


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
class ShardModel:
    def __init__(self, storage_uri: str, run_id: str, shard: int):
        configure_threads(1)  # many small batches on a shared machine: one thread each
        declare_worker_gpus()
        self.ctx = open_run(storage_uri, run_id)
        # a replica granted a GPU (serving.gpus_per_replica) predicts on it, else on CPU;
        # only a run pinned to training.device=cpu stays on CPU regardless
        self.device = usable_device(self.ctx.config.training.device)
        self.shard = shard
        self._models: OrderedDict[str, torch.nn.Module] = OrderedDict()

    def _model(self, version: str) -> torch.nn.Module:
        if version in self._models:
            self._models.move_to_end(version)
            return self._models[version]
        m = load_serving_model(self.ctx, version, self.device)  # a snapshot, or a method's own
        self._models[version] = m
        while len(self._models) > _CACHED_VERSIONS:
            self._models.popitem(last=False)
        return m

    def loaded_versions(self) -> list[str]:
        return list(self._models)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def predict(self, calls: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
        """Each call: (version, (n, D) float32) -> (n, classes). Calls are grouped by version."""
        out: list[np.ndarray | None] = [None] * len(calls)
        by_version: dict[str, list[int]] = {}
        for i, (version, _) in enumerate(calls):
            by_version.setdefault(version, []).append(i)
        for version, idx in by_version.items():
            x = np.concatenate([calls[i][1] for i in idx])
            probs = predict_proba(self._model(version), torch.from_numpy(x)).numpy()
            start = 0
            for i in idx:
                n = len(calls[i][1])
                out[i] = probs[start : start + n]
                start += n
        return out  # type: ignore[return-value]
