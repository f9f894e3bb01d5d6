"""Audits: which live model versions contain a person's or a sample's data, and why.

The answer comes from the manifests (the exact ids each version was trained on), not from
the plan: it checks what was actually trained, so a bug in unlearning shows up here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ray_unlearn.platform.core.deletion_log import RequestRecord, RequestState
from ray_unlearn.platform.core.publish import store_report
from ray_unlearn.platform.core.run import RunContext
from ray_unlearn.platform.core.versions import chain_exactness
from ray_unlearn.platform.methods import registry


def audit(
    ctx: RunContext, *, owner_id: str | None = None, sample_id: int | None = None
) -> dict[str, Any]:
    """Audit one owner, one sample, or (neither given) every deletion executed so far.

    ``clean`` is True when no live version contains data whose deletion is done, and no
    version outside the live chain (every version folder on disk is checked) still holds
    weights or other data-derived files of such data; data not (yet) deleted is reported
    but is not a violation.
    """
    if owner_id is not None and sample_id is not None:
        raise ValueError("audit takes an owner id or a sample id, not both")
    log = ctx.deletion_log
    if owner_id is not None:
        ids = ctx.plan.samples_of_owner(owner_id)
        subject = {"owner_id": owner_id}
        # from the log's owner and sample indexes, not a fold of every request
        related = _union([log.requests_for_owner(owner_id), log.requests_for_samples(ids)])
    elif sample_id is not None:
        ctx.plan.positions([sample_id])  # raises on an unknown id
        ids = np.asarray([sample_id], dtype=np.int64)
        subject = {"sample_id": int(sample_id)}
        related = log.requests_for_sample(int(sample_id))
    else:
        ids = np.fromiter(log.deleted_sample_ids(), dtype=np.int64)
        subject = {"all_deletions": True}
        related = log.records()
    deleted = log.deleted_among(ids)  # of the ids in question
    approximate = approximate_live_versions(ctx)
    containing = ctx.model_store.live_versions_containing(ids)
    violations = {v: [i for i in hits if i in deleted] for v, hits in containing.items()}
    violations = {v: hits for v, hits in violations.items() if hits}
    # the store itself: versions an interrupted publish left outside the live chain
    store = store_report(ctx, deleted)
    return {
        "run_id": ctx.run_id,
        **subject,
        "sample_ids": [int(i) for i in ids] if len(ids) <= 1000 else f"{len(ids)} samples",
        "deleted_sample_count": len(deleted),
        "live_versions_containing": containing,
        "violations": violations,
        "clean": not violations and not store["stray_violations"],
        **store,
        # live versions an approximate strategy (a direct parameter update) produced,
        # or that descend from one: deletions behind them were honoured approximately (the
        # deleted ids are in no manifest, but the weights are not a retrain without them)
        "approximate_live_versions": approximate,
        "exact": not approximate,
        "requests": [
            {
                "request_id": r.request.request_id,
                "state": r.state.value,
                "owner_id": r.request.owner_id,
                "samples": len(r.request.sample_ids),
                "received_at": r.request.received_at,
                "done_at": r.done_at,
                "versions_retired": r.versions_retired,
                "strategy": r.details.get("strategy"),
                "exact": r.details.get("exact"),
                "history": [{"state": h["state"], "at": h["at"]} for h in r.history],
            }
            for r in related
        ],
        "pending_requests": sum(r.state != RequestState.DONE for r in related),
    }


def approximate_live_versions(ctx: RunContext) -> list[str]:
    """Live versions whose snapshot is not exact: the run's method judges its chains when
    it says how (a method whose deletions only deactivate stages: always exact), else
    :func:`chain_exactness`."""
    out = []
    for entry in ctx.model_store.registry().shards.values():
        exact = registry.chain_exact(ctx, entry)
        if exact is None:
            exact = chain_exactness(ctx, entry.chain)
        out += [v for v, ok in zip(entry.chain, exact, strict=True) if not ok]
    return out


def _union(groups: list[list[RequestRecord]]) -> list[RequestRecord]:
    """The requests of several index look-ups, each once, in the log's order."""
    seen: dict[str, RequestRecord] = {}
    for group in groups:
        for r in group:
            seen.setdefault(r.request_id, r)
    return sorted(seen.values(), key=lambda r: (r.request.received_at, r.request_id))
