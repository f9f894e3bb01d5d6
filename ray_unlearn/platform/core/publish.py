"""Crash-safe publishing: an intent record before the registry switch, recovery after a crash.

An execution runs under the run's lease (platform/core/lease.py) and leaves a trail in
``models/publish-intent.json`` so that a kill -9 at any point can be finished or undone:

1. ``executing`` (written when the lease is taken): shards may be writing new versions. A
   crash here leaves *orphans*: version folders in no live chain, manifests ``live``,
   weights on disk.
2. ``publishing`` (written just before the switch): the new registry's versions, the
   versions it retires, the requests and what their ``done`` records will say.
3. the registry switches (compare-and-swap, platform/core/versions.py); old versions are retired;
   requests are marked done; the intent is deleted.

:func:`recover` runs at the start of every execution, under the lease. Whatever phase it
finds, every version folder that is not in the live chain and still holds data-derived
files (or says ``live``) is retired: for a switched publish that is the old chain, for an
unswitched one the new versions it wrote, for a crash while training the orphans. A
switched publish's requests are then marked done with the records the intent carries; an
unswitched one's stay unfinished and the execution that follows runs them again (training
is deterministic, so it writes the same versions). :func:`inspect` is the read-only form
for ``audit``. Retiring is idempotent, so recovery itself may crash and run again.

A test or the ``benchmarks/publish_safety.py`` harness can stop an execution at a named
point (``RAY_UNLEARN_TEST_PAUSE_AT=registry-switched``) to kill it there; see
:func:`pause_point`.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any

import numpy as np

from ray_unlearn.platform.core.deletion_log import RequestState
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.run import RunContext
from ray_unlearn.platform.core.storage import StorageError
from ray_unlearn.platform.core.versions import LIVE, ShardEntry

EXECUTING, PUBLISHING = "executing", "publishing"
PAUSE_POINTS = (
    "lease-acquired",
    "trained",
    "intent-written",
    "registry-switched",
    "retiring",
    "retired",
    "done",
)


def pause_point(name: str) -> None:
    """Test hook: if ``RAY_UNLEARN_TEST_PAUSE_AT`` names this point, say so on stderr (and
    in the file ``RAY_UNLEARN_TEST_PAUSE_FILE``, if set) and sleep
    ``RAY_UNLEARN_TEST_PAUSE_S`` seconds (default 60) so that a test can kill -9 us here."""
    if os.environ.get("RAY_UNLEARN_TEST_PAUSE_AT") != name:
        return
    marker = os.environ.get("RAY_UNLEARN_TEST_PAUSE_FILE")
    if marker:
        with open(marker, "w") as f:
            f.write(f"{os.getpid()} {name}\n")
    print(f"paused at {name} (pid {os.getpid()})", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("RAY_UNLEARN_TEST_PAUSE_S", "60")))


# -- the intent record ---------------------------------------------------------------------
def read_intent(ctx: RunContext) -> dict[str, Any] | None:
    try:
        return ctx.storage.read_json(ctx.layout.publish_intent)
    except (StorageError, ValueError):  # none, or torn: a torn one names nothing published
        return None


def has_intent(ctx: RunContext) -> bool:
    return ctx.storage.exists(ctx.layout.publish_intent)


def write_intent(ctx: RunContext, doc: dict[str, Any]) -> None:
    ctx.storage.write_json(ctx.layout.publish_intent, {**doc, "written_at": time.time()})


def clear_intent(ctx: RunContext) -> None:
    ctx.storage.delete(ctx.layout.publish_intent)


# -- publishing ------------------------------------------------------------------------------
def shards_of(ctx: RunContext, sample_ids) -> list[int]:
    """The training shards holding ``sample_ids`` (held-out rows belong to none)."""
    ids = np.asarray(sample_ids, dtype=np.int64)
    if not len(ids):
        return []
    shards, _ = ctx.plan.locate(ids)
    return sorted({int(k) for k in shards.tolist() if k != TEST})


def done_details(
    ctx: RunContext,
    sample_ids,
    results: dict[int, dict[str, Any]],
    *,
    executor: str,
    strategy: str,
    batch: list[str],
    seconds: float,
) -> dict[str, Any]:
    """What a request's ``done`` record says about the execution that honoured it."""
    shards = shards_of(ctx, sample_ids)
    touched = [results[k] for k in shards if k in results and results[k].get("changed")]
    return {
        "executed_by": executor,
        "strategy": strategy,
        "batch": batch,
        "shards": shards,
        "first_slices": {str(t["shard"]): t["first_stage"] for t in touched},
        "versions_retired": [v for t in touched for v in t["retired"]],
        "versions_created": [v for t in touched for v in t["created"]],
        "emptied_shards": [t["shard"] for t in touched if t["empty"]],
        "seconds": seconds,
        "train_seconds": sum(t.get("train_seconds", 0.0) for t in results.values()),
        "train_cpu_seconds": sum(t.get("train_cpu_seconds", 0.0) for t in results.values()),
        # each shard worker's own wall time for its part (reload check, the remaining rows,
        # retraining, saving the new versions): with train_seconds and ``seconds``, where a
        # request's fixed cost goes (benchmarks/unlearning_speed.py splits it)
        "shard_seconds": {str(k): t["seconds"] for k, t in results.items() if "seconds" in t},
        # of that, beyond training: reload check, remaining rows' copy, saving (SISA shards)
        "shard_parts_seconds": {
            str(k): t["parts_seconds"] for k, t in results.items() if "parts_seconds" in t
        },
        "shards_reloaded": sorted(int(k) for k, t in results.items() if t.get("reloaded")),
        "exact": all(t.get("exact", True) for t in touched),
        "strategy_info": {str(t["shard"]): t["info"] for t in touched if t.get("info")},
    }


def publish(
    ctx: RunContext,
    results: dict[int, dict[str, Any]],
    request_ids: list[str],
    *,
    lease,
    details: dict[str, dict[str, Any]] | None = None,
) -> int:
    """Switch the registry to ``results``' chains and retire what they replace.

    ``lease``: the held :class:`~ray_unlearn.platform.core.lease.Lease` (checked before the
    intent and before the switch); ``details``: request id -> its ``done`` record, kept in
    the intent so that recovery can finish the requests. Returns the registry generation.
    """
    store = ctx.model_store
    pause_point("trained")
    reg = store.registry()
    retire: list[str] = []
    created: list[str] = []
    for k, res in results.items():
        if not res.get("changed"):
            continue
        current = reg.shards.get(k)
        if current is not None and res["generation"] < current.generation:
            # a newer state of this shard is already published (a deactivation that ran
            # while this result's restore trained): keep it; this result's victims and its
            # own new versions (never published) go
            retire += res["retired"] + res.get("created", [])
            continue
        reg.shards[k] = ShardEntry(
            res["chain"], res["generation"], res["empty"], res.get("serving"), res.get("meta", {})
        )
        retire += res["retired"]
        created += res.get("created", [])
    live = set(reg.live_versions())
    retire = sorted(set(retire) - live)  # never purge a version the new registry serves
    missing = [v for v in created if not store.storage.exists(store.layout.version_manifest(v))]
    if missing:
        raise RuntimeError(
            f"run {ctx.run_id}: versions {missing[:5]} of the new registry are not complete on "
            "disk (purged by a recovery, or their write failed): nothing was published"
        )
    lease.check()
    write_intent(
        ctx,
        {
            "phase": PUBLISHING,
            "id": uuid.uuid4().hex,
            "lease_generation": lease.generation,
            "registry_from": reg.generation,
            "registry_to": (reg.generation or 0) + 1,
            "created": created,
            "retire": retire,
            "request_ids": list(request_ids),
            "details": details or {},
        },
    )
    pause_point("intent-written")
    lease.check()
    gen = store.write_registry(reg)  # the switch; RegistryConflict if another writer won
    pause_point("registry-switched")
    store.retire(retire[:1], request_ids=request_ids)
    pause_point("retiring")  # a crash in the middle of retiring
    store.retire(retire[1:], request_ids=request_ids)
    pause_point("retired")
    return gen


# -- recovery --------------------------------------------------------------------------------
def _switched(intent: dict[str, Any], live: set[str], generation: int) -> bool:
    created, retire = intent.get("created", []), intent.get("retire", [])
    if created or retire:
        return all(v in live for v in created) and not any(v in live for v in retire)
    return generation >= int(intent.get("registry_to", 0))


def stray_versions(ctx: RunContext, live: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every version folder outside the live chain that still holds data-derived files or
    whose manifest still says ``live`` (one listing of ``models/`` plus one per version)."""
    store = ctx.model_store
    live = set(store.registry().live_versions()) if live is None else live
    out = {}
    for vid in store.version_folders():
        if vid in live:
            continue
        files = store.data_files(vid)
        try:
            state = store.manifest(vid).get("state")
        except (StorageError, ValueError):
            state = None  # its save was cut short before the manifest
        if files or state in (LIVE, None):
            out[vid] = {"files": files, "manifest_state": state}
    return out


def inspect(ctx: RunContext) -> dict[str, Any]:
    """Read-only: what :func:`recover` would find and do now."""
    reg = ctx.model_store.registry()
    live = set(reg.live_versions())
    intent = read_intent(ctx)
    out: dict[str, Any] = {"intent": None}
    if intent is not None:
        out["intent"] = {
            "phase": intent.get("phase"),
            "request_ids": intent.get("request_ids", []),
            "written_at": intent.get("written_at"),
        }
        if intent.get("phase") == PUBLISHING:
            out["intent"]["switched"] = _switched(intent, live, reg.generation or 0)
    out["would_retire"] = sorted(stray_versions(ctx, live))
    return out


def recover(ctx: RunContext, *, executor: str, keep=()) -> dict[str, Any]:
    """Finish or roll back whatever an interrupted execution left (see the module doc).

    Call it under the lease. ``keep``: versions written by this process and about to be
    published (a method's restore trained outside the lease): not orphans."""
    intent = read_intent(ctx)
    if intent is None and not has_intent(ctx):
        return {"intent": None}
    store, log = ctx.model_store, ctx.deletion_log
    reg = store.registry()
    live = set(reg.live_versions())
    phase = intent.get("phase") if intent else None
    switched = phase == PUBLISHING and _switched(intent, live, reg.generation or 0)
    request_ids = (intent or {}).get("request_ids", []) or ["recovery"]
    stray = sorted(set(stray_versions(ctx, live)) - set(keep))
    store.retire(stray, request_ids=request_ids)
    finished = []
    if switched:
        # as in a whole execution, "done" means scrubbed (reports, the data copy, transport)
        from ray_unlearn.platform.core.compaction import scrub_deleted

        ids = set(log.deleted_sample_ids())
        for rid in intent.get("details", {}):
            ids.update(log.get(rid).request.sample_ids)
        scrub_deleted(ctx, ids)
        for rid, details in intent.get("details", {}).items():
            rec = log.get(rid)
            if rec.state == RequestState.DONE:
                continue
            if rec.state != RequestState.EXECUTING:  # failed (the error path ran) or re-queued
                log.transition(rid, RequestState.EXECUTING, executed_by=executor)
            log.transition(rid, RequestState.DONE, **details, recovered_by=executor)
            finished.append(rid)
    clear_intent(ctx)
    return {
        "intent": phase,
        "switched": switched,
        "retired": stray,
        "finished_requests": finished,
        "requeued": [] if switched else list((intent or {}).get("request_ids", [])),
    }


def store_report(ctx: RunContext, deleted_ids) -> dict[str, Any]:
    """The store itself, not only the registry: every version folder on disk.

    ``stray_versions``: outside the live chain with data-derived files or a ``live``
    manifest; ``stray_violations``: those of them trained on a sample in ``deleted_ids``
    (one whose sample list is gone counts as possibly holding any); ``manifest_mismatch``:
    live versions whose manifest does not say ``live``; ``recovery``: :func:`inspect`."""
    store = ctx.model_store
    live = set(store.registry().live_versions())
    deleted = np.fromiter(deleted_ids, dtype=np.int64)
    stray = stray_versions(ctx, live)
    violations: dict[str, Any] = {}
    for vid, info in stray.items():
        try:
            hit = deleted[np.isin(deleted, store.sample_ids(vid))]
        except (StorageError, OSError, KeyError):
            violations[vid] = "unknown: its sample list is missing"
            continue
        if len(hit):
            violations[vid] = sorted(int(i) for i in hit)
        info["deleted_samples"] = int(len(hit))
    mismatch = []
    for vid in sorted(live):
        try:
            state = store.manifest(vid).get("state")
        except (StorageError, ValueError):
            state = None
        if state != LIVE:
            mismatch.append({"version": vid, "manifest_state": state, "in_registry": True})
    mismatch += [
        {"version": v, "manifest_state": i["manifest_state"], "in_registry": False}
        for v, i in sorted(stray.items())
        if i["manifest_state"] == LIVE
    ]
    return {
        "stray_versions": stray,
        "stray_violations": violations,
        "manifest_mismatch": mismatch,
        "recovery": inspect(ctx),
    }
