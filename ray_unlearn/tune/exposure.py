"""Exposure checked from outside the serving decisions: did an answer come from a model that
holds data whose deletion was already submitted?

The serving code labels its own answers (certified, excluded, stale, ...); counting the
"stale" labels would only repeat what the decision code says about itself. This check reads
other evidence instead: the shards whose models actually produced outputs for an answer (the
caller records them as it queries), the run's registry at that moment (which versions those
shards serve, and the chains they are built from), the versions' stored sample lists, and the
deletion log (every request submitted so far, whatever its state). An answer is a violation
when any version behind a voting shard was trained on a sample of a submitted deletion.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ray_unlearn.platform.core.run import RunContext


class ExposureCheck:
    """Reads the run's store and log on each call: the registry and the log at that moment."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def submitted_ids(self) -> np.ndarray:
        """Sample ids of every deletion request logged so far (pending, executing or done)."""
        ids = [r.request.sample_ids for r in self.ctx.deletion_log.records()]
        return np.unique(np.concatenate(ids)).astype(np.int64) if ids else np.zeros(0, np.int64)

    def versions_behind(self, shards: Iterable[int]) -> list[str]:
        """Every live version the given shards' current models are built from: each shard's
        whole chain (a slice checkpoint descends from the earlier slices; an S3T shard's
        stages stack) plus the shared versions (the S3T backbone)."""
        reg = self.ctx.model_store.registry()
        out = list(reg.shared)
        for k in sorted(set(shards)):
            entry = reg.shards.get(int(k))
            if entry is None or entry.empty:
                continue
            out += [v for v in entry.chain if v not in out]
            if entry.serving_version and entry.serving_version not in out:
                out.append(entry.serving_version)
        return out

    def holding_submitted(self, shards: Iterable[int]) -> dict[str, list[int]]:
        """version -> submitted sample ids it was trained on, over the versions behind
        ``shards`` (empty: answers from these shards expose nothing)."""
        wanted = self.submitted_ids()
        out: dict[str, list[int]] = {}
        if not len(wanted):
            return out
        for vid in self.versions_behind(shards):
            hit = wanted[np.isin(wanted, self.ctx.model_store.sample_ids(vid))]
            if len(hit):
                out[vid] = sorted(int(i) for i in hit)
        return out
