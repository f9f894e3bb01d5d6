"""The control plane against the size of the log and of the data: no training, no Ray.

Run:  .venv/bin/python benchmarks/control_plane.py --out results/control_plane [--quick]
      [--parts log,audit] [--backends local,mem] [--requests 1000,10000,100000]
      [--samples 100000,1000000]

Each invocation measures what it is asked and merges its figures into <out>/control_plane.json
(so a full run can be split into short invocations, e.g. one per size), then redraws
<out>/control_plane.png from everything measured so far.

``log`` part, per backend (``local``: a directory on the local disk; ``mem``: pyarrow's
in-memory filesystem through the object-store code path: check-then-write, temp key + move)
and per N logged requests:

* setup (not timed as a figure): N requests, each with its executing and done events and
  their feed markers, written in the log's own layout with arrivals 10 ms apart (100/s), the
  last 20 left pending; then the real log reads them all and writes a snapshot.
* ``per_request_ms``: one request's whole bookkeeping through the real log by a warm writer
  (the executor): submit, transition to executing, transition to done, and the executor's
  read of what is unfinished; median (and p90) over 100 (``--quick``: 30) requests added on
  top of the N. ``snapshot_s``: the time to write one snapshot at this size, and
  ``snapshot_ms_per_record``: that cost spread over the records between two snapshots (a
  poll writes one every max(2000, requests/20) records).
* ``cold_reader_s``: a new reader's ``unfinished()`` (newest snapshot + tail);
  ``cold_records_s``: a new reader's ``records()`` (every request materialised); both with
  this process's own objects frozen out of the garbage collector (``gc.freeze``), as in the
  new process a cold reader is; ``*_busy_heap_s``: the same without that (a full collection
  then rescans the setup's millions of objects: the figures before 2026-12-03's second run).
* ``gateway_poll_ms``: the gateway's read (``read_view``: the log's unfinished requests and
  the registry) and ``ServingView.adopt``, with one new request logged between polls by
  another writer; median over 50 (20) polls, plus one ``answer_batch`` of 32 instances.

``audit`` part, per S samples in the plan (owners of 100 samples, 16 shards x 4 slices, every
version's sample list stored as training would): ``audit_ms``: ``audit(ctx, owner_id=o)`` for
random owners (median over 30 (10)), after a first audit that builds the stored sample index
(``first_audit_s``) and in a new process context that reads it (``cold_audit_ms``); 100 of
the owners have requests in the log, half of them done. ``mem`` backend for the audit is not
run (the index and store code are the same; the local disk is the slower).

Targets (issue 17): per-request log overhead at 100k within 2x of 1k; cold reader of 100k
under 2 s; audit of one owner under 50 ms at 1M samples; gateway poll independent of N.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ray_unlearn.platform.core import deletion_feed as feed
from ray_unlearn.platform.core.audit import audit
from ray_unlearn.platform.core.config import config_from_dict
from ray_unlearn.platform.core.deletion_log import DeletionLog
from ray_unlearn.platform.core.plan import PartitionPlan
from ray_unlearn.platform.core.run import RunContext
from ray_unlearn.platform.core.storage import RunLayout, Storage
from ray_unlearn.platform.core.versions import ModelStore, Registry, ShardEntry
from ray_unlearn.platform.serving.policies import get_policy, list_policies
from ray_unlearn.platform.serving.view import (
    DeletionTracker,
    ServingView,
    answer_batch,
    read_view,
)

LAYOUT = RunLayout("bench")
PENDING_TAIL = 20
SHARDS, SLICES = 16, 4


def _put(storage: Storage, rel: str, data: bytes, made: set[str]) -> None:
    """Setup writes in the log's layout, without the per-file fsync (not what is measured)."""
    folder = rel.rsplit("/", 1)[0]
    if storage.local:
        if folder not in made:
            os.makedirs(storage.full(folder), exist_ok=True)
            made.add(folder)
        with open(storage.full(rel), "wb") as f:
            f.write(data)
        return
    if folder not in made:
        storage.fs.create_dir(storage.full(folder), recursive=True)
        made.add(folder)
    with storage.fs.open_output_stream(storage.full(rel)) as f:
        f.write(data)


def fill_log(storage: Storage, n: int) -> None:
    """N requests in the log's layout, arrivals 10 ms apart ending a minute ago."""
    made: set[str] = set()
    t0 = time.time_ns() - n * 10_000_000 - 60 * 10**9
    for i in range(n):
        rid, ns = f"b{i:07d}", t0 + i * 10_000_000
        req = {
            "request_id": rid,
            "sample_ids": [i],
            "owner_id": f"o{i // 100}",
            "received_at": ns / 1e9,
            "deadline": None,
        }
        records = [(feed.REQUEST_FILE, json.dumps(req, sort_keys=True).encode(), ns)]
        if i < n - PENDING_TAIL:
            for k, (st, extra) in enumerate(
                (("executing", {"executed_by": "bench"}), ("done", {"versions_retired": []}))
            ):
                ens = ns + (k + 1) * 1_000_000
                body = {"request_id": rid, "state": st, "at": ens / 1e9, "details": extra}
                name = f"{ens:020d}-{uuid.uuid4().hex[:8]}.json"
                records.append((name, json.dumps(body, sort_keys=True).encode(), ens))
        for record, data, mns in records:
            bucket = f"{LAYOUT.deletion_feed}/{mns // feed.BUCKET_NS:012d}"
            _put(storage, f"{bucket}/{feed.marker_name(mns, rid, record)}", b"", made)
            _put(storage, f"{LAYOUT.deletion_request_dir(rid)}/{record}", data, made)


def _plan(n: int) -> PartitionPlan:
    ids = np.arange(n, dtype=np.int64)
    return PartitionPlan(
        ids,
        (ids // 100).astype(str),
        (ids % SHARDS).astype(np.int32),
        ((ids // SHARDS) % SLICES).astype(np.int32),
        SHARDS,
        SLICES,
    )


def _registry(storage: Storage) -> None:
    reg = Registry({k: ShardEntry([f"s{k:03d}-r03-g0000"], 0) for k in range(SHARDS)})
    ModelStore(storage, LAYOUT).write_registry(reg)


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "median": statistics.median(xs),
        "mean": statistics.fmean(xs),
        "p90": xs[int(0.9 * (len(xs) - 1))],
        "max": xs[-1],
    }


def bench_log(storage: Storage, n: int, quick: bool) -> dict:
    out: dict = {"requests": n}
    t = time.perf_counter()
    fill_log(storage, n)
    out["fill_s"] = time.perf_counter() - t
    first = DeletionLog(storage, LAYOUT, snapshot_every=None)
    t = time.perf_counter()
    first.poll()
    out["full_fold_no_snapshot_s"] = time.perf_counter() - t
    t = time.perf_counter()
    first.snapshot()
    out["snapshot_s"] = time.perf_counter() - t
    out["snapshot_ms_per_record"] = 1e3 * out["snapshot_s"] / max(2000, n // 20)
    _registry(storage)

    # the executor: a warm writer doing each request's bookkeeping
    writer = DeletionLog(storage, LAYOUT)
    writer.unfinished()
    per = []
    for i in range(30 if quick else 100):
        rid = f"m{i:05d}"
        t = time.perf_counter()
        writer.submit([n + i], owner_id=f"new{i}", request_id=rid)
        writer.transition(rid, "executing", executed_by="bench")
        writer.transition(rid, "done", versions_retired=["x"])
        writer.unfinished()
        per.append(1e3 * (time.perf_counter() - t))
    out["per_request_ms"] = _stats(per)
    # with the executor's snapshots spread over the records between two of them (3 a request)
    out["per_request_amortised_ms"] = (
        out["per_request_ms"]["median"] + 3 * out["snapshot_ms_per_record"]
    )

    # A cold reader is a new process (a restarted executor): its garbage collector scans its
    # own objects only. This process still holds the setup's full fold and the writer's state
    # (millions of objects), which a full collection triggered by the reader's allocations
    # would rescan: frozen out of the collector for the cold figures (gc.freeze), and
    # measured once more without that (``*_busy_heap_s``) to show the difference.
    _cold_reads(storage, out, "_busy_heap")
    gc.collect()
    gc.freeze()
    try:
        unfinished, records = _cold_reads(storage, out, "")
    finally:
        gc.unfreeze()
    if len(unfinished) != PENDING_TAIL or len(records) != n + len(per):
        raise RuntimeError(
            f"log at {n}: {len(unfinished)} unfinished (want {PENDING_TAIL}), "
            f"{len(records)} records (want {n + len(per)})"
        )

    # the gateway: its own reader, another writer logging one request between polls
    plan = _plan(n + 1000)
    ctx = SimpleNamespace(
        deletion_log=DeletionLog(storage, LAYOUT), model_store=ModelStore(storage, LAYOUT)
    )
    view = ServingView(DeletionTracker(plan))
    view.adopt(*read_view(ctx))
    other = DeletionLog(storage, LAYOUT, snapshot_every=None)
    polls = []
    for i in range(20 if quick else 50):
        other.submit([n + 500 + i], request_id=f"g{i:05d}")
        t = time.perf_counter()
        view.adopt(*read_view(ctx))
        polls.append(1e3 * (time.perf_counter() - t))
    out["gateway_poll_ms"] = _stats(polls)
    if len(view.tracker.items) != PENDING_TAIL + len(polls):
        raise RuntimeError(f"gateway view holds {len(view.tracker.items)} pending requests")
    probs = {k: np.random.default_rng(k).dirichlet(np.ones(10), size=32) for k in range(SHARDS)}
    t = time.perf_counter()
    answer_batch(
        get_policy(list_policies()[0]),
        "vote",
        list(range(SHARDS)),
        view.tracker.affected(),
        probs,
        n=32,
        pending=True,
    )
    out["answer_batch_ms"] = 1e3 * (time.perf_counter() - t)
    return out


def _cold_reads(storage: Storage, out: dict, suffix: str):
    """A new reader's ``unfinished()`` and another's ``records()``, timed into ``out``."""
    t = time.perf_counter()
    unfinished = DeletionLog(storage, LAYOUT).unfinished()
    out[f"cold_reader{suffix}_s"] = time.perf_counter() - t
    t = time.perf_counter()
    records = DeletionLog(storage, LAYOUT).records()
    out[f"cold_records{suffix}_s"] = time.perf_counter() - t
    return unfinished, records


def bench_audit(root: Path, n: int, quick: bool) -> dict:
    storage = Storage(root)
    plan = _plan(n)
    store = ModelStore(storage, LAYOUT)
    reg = Registry()
    state = {"w": torch.zeros(4)}
    for k in range(SHARDS):
        members, slices = plan.shard_members(k)
        chain = []
        for r in range(SLICES):
            vid = f"s{k:03d}-r{r:02d}-g0000"
            store.save_version(
                shard=k,
                stage=r,
                generation=0,
                state=state,
                sample_ids=members[slices <= r],
                parent=chain[-1] if chain else None,
                metrics={},
                config_digest="bench",
                created_by="bench",
            )
            chain.append(vid)
        reg.shards[k] = ShardEntry(chain, 0)
    store.write_registry(reg)
    dlog = DeletionLog(storage, LAYOUT)
    rng = np.random.default_rng(0)
    owners = rng.choice(n // 100, size=100, replace=False)
    for j, o in enumerate(owners):
        rid = f"a{j:04d}"
        dlog.submit(plan.samples_of_owner(str(o))[:3], owner_id=str(o), request_id=rid)
        if j % 2 == 0:
            dlog.transition(rid, "executing")
            dlog.transition(rid, "done")
    ctx = RunContext(storage, LAYOUT, config_from_dict({}), plan, {})
    t = time.perf_counter()
    first = audit(ctx, owner_id=str(owners[0]))
    out: dict = {"samples": n, "first_audit_s": time.perf_counter() - t}
    if first["violations"] == {} or not first["requests"]:
        # owner 0's request is done but the versions were never retrained: a violation the
        # audit must see (proof that it reads the versions, not the log's word)
        raise RuntimeError(f"audit missed the planted violation: {first['violations']}")
    times = []
    for o in rng.choice(n // 100, size=10 if quick else 30, replace=False):
        t = time.perf_counter()
        audit(ctx, owner_id=str(o))
        times.append(1e3 * (time.perf_counter() - t))
    out["audit_ms"] = _stats(times)
    cold = RunContext(storage, LAYOUT, config_from_dict({}), plan, {})
    t = time.perf_counter()
    audit(cold, owner_id=str(owners[1]))
    out["cold_audit_ms"] = 1e3 * (time.perf_counter() - t)
    return out


def _merge(path: Path, section: str, key: str, value: dict) -> dict:
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault(section, {})[key] = value
    path.write_text(json.dumps(doc, indent=1, sort_keys=True))
    return doc


def plot(doc: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        ("per_request_ms", "per-request log bookkeeping (ms, median)", "requests logged"),
        ("cold_reader_s", "cold reader: unfinished() (s)", "requests logged"),
        ("gateway_poll_ms", "gateway poll (ms, median)", "requests logged"),
    ]
    for ax, (key, title, xlabel) in zip(axes.flat, panels, strict=False):
        for backend in ("local", "mem"):
            rows = sorted(
                (v for k, v in doc.get("log", {}).items() if k.startswith(backend + ":")),
                key=lambda v: v["requests"],
            )
            if rows:
                ys = [r[key]["median"] if isinstance(r[key], dict) else r[key] for r in rows]
                ax.plot([r["requests"] for r in rows], ys, "o-", label=backend)
        if key == "cold_reader_s":
            ax.axhline(2.0, color="grey", lw=0.8, ls=":", label="target at 100k: 2 s")
        ax.set(xscale="log", yscale="log", title=title, xlabel=xlabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    ax = axes.flat[3]
    rows = sorted(doc.get("audit", {}).values(), key=lambda v: v["samples"])
    if rows:
        xs = [r["samples"] for r in rows]
        ax.plot(xs, [r["audit_ms"]["median"] for r in rows], "o-", label="warm (median)")
        ax.plot(xs, [r["cold_audit_ms"] for r in rows], "s--", label="new context")
        ax.axhline(50, color="grey", lw=0.8, ls=":", label="target 50 ms")
        ax.legend()
    ax.set(xscale="log", yscale="log", title="audit of one owner (ms)", xlabel="samples")
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("control plane vs size (no training)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--quick", action="store_true", help="1k and 10k requests, 100k samples")
    p.add_argument("--parts", default="log,audit")
    p.add_argument("--backends", default="local,mem")
    p.add_argument("--requests", default=None, help="comma-separated N (default 1k,10k,100k)")
    p.add_argument("--samples", default=None, help="comma-separated S (default 100k,1M)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp)")
    a = p.parse_args()
    ns = [
        int(x)
        for x in (a.requests or ("1000,10000" if a.quick else "1000,10000,100000")).split(",")
    ]
    ss = [int(x) for x in (a.samples or ("100000" if a.quick else "100000,1000000")).split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "control_plane.json"
    doc: dict = json.loads(path.read_text()) if path.exists() else {}
    parts = a.parts.split(",")
    for backend in a.backends.split(",") if "log" in parts else []:
        for n in ns:
            work = Path(tempfile.mkdtemp(prefix="cp-", dir=a.work))
            storage = Storage(work) if backend == "local" else Storage(f"mock:///{work.name}")
            try:
                res = bench_log(storage, n, a.quick)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            res["backend"] = backend
            doc = _merge(path, "log", f"{backend}:{n}", res)
            print(
                f"log {backend:5s} N={n:>7}: per-request {res['per_request_ms']['median']:.2f} ms"
                f" (p90 {res['per_request_ms']['p90']:.2f}), cold reader {res['cold_reader_s']:.3f} s"
                f" ({res['cold_reader_busy_heap_s']:.3f} s in the busy heap),"
                f" records() {res['cold_records_s']:.3f} s, gateway poll"
                f" {res['gateway_poll_ms']['median']:.2f} ms, snapshot {res['snapshot_s']:.2f} s",
                flush=True,
            )
    if "audit" in parts:
        for n in ss:
            work = Path(tempfile.mkdtemp(prefix="cp-audit-", dir=a.work))
            try:
                res = bench_audit(work, n, a.quick)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            doc = _merge(path, "audit", str(n), res)
            print(
                f"audit S={n:>8}: {res['audit_ms']['median']:.1f} ms median"
                f" (p90 {res['audit_ms']['p90']:.1f}), new context {res['cold_audit_ms']:.1f} ms,"
                f" first (builds the index) {res['first_audit_s']:.2f} s",
                flush=True,
            )
    plot(doc, a.out / "control_plane.png")
    print(f"wrote {path} and {a.out / 'control_plane.png'}")


if __name__ == "__main__":
    main()
