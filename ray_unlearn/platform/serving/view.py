"""The serving gateway's decisions, without Ray: which deletions are pending on which shards,
and how each inference instance is answered under a policy.

The Ray Serve gateway (``ray_unlearn.serve.gateway``) keeps a :class:`DeletionTracker` in
memory, asks :func:`answer_batch` what to do with the instances of a request, queries only
the shards that answer needs, and waits or executes deletions as the policy says.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ray_unlearn.platform.core.deletion_log import RequestRecord
from ray_unlearn.platform.core.plan import TEST, PartitionPlan
from ray_unlearn.platform.serving.certify import aggregate_subset, certify
from ray_unlearn.platform.serving.policies import PendingView, ServingPolicy, answer_mode


@dataclass
class Pending:
    request_id: str
    shards: frozenset[int]  # shards whose live models hold the request's samples
    received_at: float
    deadline: float | None
    executing: bool = False


@dataclass
class DeletionTracker:
    """In-memory view of the unfinished deletion requests (the log is the record)."""

    plan: PartitionPlan
    items: dict[str, Pending] = field(default_factory=dict)

    def add(self, record: RequestRecord) -> Pending:
        rid = record.request.request_id
        if rid not in self.items:
            shards, _ = self.plan.locate(record.request.sample_ids)
            self.items[rid] = Pending(
                rid,
                frozenset(int(k) for k in shards if k != TEST),
                record.request.received_at,
                record.request.deadline,
            )
        return self.items[rid]

    def sync(self, unfinished: list[RequestRecord]) -> None:
        """Match the log: add requests logged elsewhere, drop the ones no longer unfinished."""
        ids = {r.request.request_id for r in unfinished}
        for r in unfinished:
            self.add(r)
        for rid in list(self.items):
            if rid not in ids:
                del self.items[rid]

    def affected(self) -> set[int]:
        return {k for p in self.items.values() for k in p.shards}

    def executing_shards(self) -> set[int]:
        return {k for p in self.items.values() if p.executing for k in p.shards}

    def waiting(self) -> list[Pending]:
        return [p for p in self.items.values() if not p.executing]

    def views(self) -> list[PendingView]:
        return [PendingView(p.received_at, p.deadline) for p in self.waiting()]

    def begin_execution(self, limit: int | None = None) -> list[str]:
        """Mark the waiting requests (the ``limit`` oldest, when given) as executing."""
        waiting = sorted(self.waiting(), key=lambda p: (p.received_at, p.request_id))
        ids = [p.request_id for p in waiting[:limit]]
        for rid in ids:
            self.items[rid].executing = True
        return ids

    def abort_execution(self, ids: list[str]) -> None:
        for rid in ids:
            if rid in self.items:
                self.items[rid].executing = False


@dataclass
class InstanceAnswer:
    mode: str  # certified | excluded | wait | reject | stale
    label: int | None = None
    scores: list[float] | None = None


def shards_to_query(policy: ServingPolicy, live: list[int], affected: set[int]) -> list[int]:
    """Only the naive baseline ever needs an affected shard's current (stale) model."""
    if policy.expose_stale:
        return list(live)
    return [k for k in live if k not in affected]


def answer_batch(
    policy: ServingPolicy,
    rule: str,
    live: list[int],
    affected: set[int],
    probs: dict[int, np.ndarray],
    *,
    n: int,
    pending: bool,
) -> list[InstanceAnswer]:
    """Answer ``n`` instances from ``probs`` (shard -> (n, classes), the shards queried).

    ``live``: the shards with a serving model; ``affected``: those with a deletion pending or
    executing. Instances whose mode is "wait" or "reject" get no label here.
    """
    affected = {k for k in affected if k in live}
    mask = np.array([k in affected for k in live], dtype=bool)
    unaffected = [k for k in live if k not in affected]
    classes = next(iter(probs.values())).shape[1] if probs else None
    if classes is None:  # nothing to certify with: every live shard is affected
        return [
            InstanceAnswer(answer_mode(policy, False, pending=pending, any_unaffected=False))
            for _ in range(n)
        ]
    # Rows of shards not queried are zeros: a certificate never reads them (it depends on
    # the unaffected shards and on m only), and zeros act as "this shard dropped out".
    stack = np.stack([probs.get(k, np.zeros((n, classes))) for k in live])  # (K, n, C)
    certified = certify(stack, mask, rule)[1] if unaffected else np.zeros(n, dtype=bool)
    keep = ~mask
    safe_labels, safe_scores = aggregate_subset(stack, keep, rule) if unaffected else (None, None)
    stale_labels, stale_scores = (
        aggregate_subset(stack, np.ones(len(live), dtype=bool), rule)
        if policy.expose_stale
        else (None, None)
    )
    out = []
    for i in range(n):
        mode = answer_mode(
            policy, bool(certified[i]), pending=pending, any_unaffected=bool(unaffected)
        )
        if mode in ("certified", "excluded"):
            # A certified label equals the unaffected shards' aggregate (the certificate
            # covers every affected shard dropping out), so both modes answer from it.
            out.append(InstanceAnswer(mode, int(safe_labels[i]), safe_scores[i].tolist()))
        elif mode == "stale":
            out.append(InstanceAnswer(mode, int(stale_labels[i]), stale_scores[i].tolist()))
        else:
            out.append(InstanceAnswer(mode))
    return out


def read_view(ctx) -> tuple[float, list[RequestRecord], dict[int, str]]:
    """One read of the run's state for a gateway: (started_at, unfinished requests, serving
    versions). The log is read before the registry on purpose: the engine switches the
    registry before it marks requests done, so a request seen done here is already served
    by versions without its samples (never dropped while an old version still answers)."""
    started_at = time.time()
    unfinished = ctx.deletion_log.unfinished()
    versions = ctx.model_store.registry().serving_versions()
    return started_at, unfinished, versions


@dataclass
class ServingView:
    """What one gateway replica answers from: the pending deletions and the versions served,
    replaced together in one step (:meth:`adopt`, no await inside), with a generation that
    changes whenever either does, and the time its read started (the fence's ``view_at``)."""

    tracker: DeletionTracker
    versions: dict[int, str] = field(default_factory=dict)
    generation: int = 0
    view_at: float | None = None

    def _key(self) -> tuple:
        return (frozenset(self.tracker.items), tuple(sorted(self.versions.items())))

    def adopt(
        self, started_at: float, unfinished: list[RequestRecord], versions: dict[int, str]
    ) -> bool:
        """Hold a newer read; True if what answers depend on changed (generation bumped).
        A read that started before the one held is ignored (two reads may overlap)."""
        if self.view_at is not None and started_at < self.view_at:
            return False
        before = self._key()
        self.tracker.sync(unfinished)
        self.versions = dict(versions)
        self.view_at = started_at
        changed = self._key() != before
        if changed:
            self.generation += 1
        return changed

    def add(self, record: RequestRecord) -> None:
        """A request this replica logged itself: gated at once (its next read confirms it)."""
        if record.request.request_id not in self.tracker.items:
            self.tracker.add(record)
            self.generation += 1

    def valid(self, now: float, lease_s: float) -> bool:
        """May this replica answer from its view now? Only within the lease of its read."""
        return self.view_at is not None and now < self.view_at + lease_s
