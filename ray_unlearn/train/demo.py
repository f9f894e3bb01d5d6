"""`ray-unlearn demo`: the whole loop on an embedded Ray, with a short report.

Train the ensemble as a Ray Train job, compare it with one model trained on all data,
forget a few owners through the long-lived executor (each timed against a full retrain
of the ensemble), audit each deletion, and print what happened.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

from ray_unlearn.harness import pick_owners
from ray_unlearn.platform.core.audit import audit
from ray_unlearn.platform.core.config import load_config
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.eval.accuracy import model_accuracy, train_single_model
from ray_unlearn.train.executor import Executor
from ray_unlearn.train.job import run_training
from ray_unlearn.train.session import connect


def run_demo(config: Path, overrides: list[str], deletions: int) -> tuple[dict[str, Any], Any]:
    t_start = time.perf_counter()
    cfg = load_config(config, overrides)
    ctx = create_run(cfg)
    connect(None)
    print(
        f"[demo] run {ctx.run_id}: training {cfg.partition.shards} shards x {cfg.partition.slices} slices "
        f"on {ctx.info['num_train']} samples as a Ray Train job",
        flush=True,
    )
    trained = run_training(ctx)
    executor = Executor(ctx.storage.uri, ctx.run_id)
    acc_ensemble = executor.test_accuracy()
    single, single_s = train_single_model(ctx)
    test = ctx.split_records("test")
    acc_single = model_accuracy(single, test.features, test.labels)
    print(
        "[demo] timing a from-scratch retrain of the whole ensemble (the cost without SISA)",
        flush=True,
    )
    full = executor.retrain_from_scratch()
    rows = []
    for owner in pick_owners(ctx, deletions, cfg.seed):
        t0 = time.perf_counter()
        rec = executor.forget(owner_id=owner)
        wall = time.perf_counter() - t0
        a = audit(ctx, owner_id=owner)
        d = rec["history"][-1]["details"]
        rows.append(
            {
                "owner_id": owner,
                "request_id": rec["request_id"],
                "state": rec["state"],
                "samples": len(rec["sample_ids"]),
                "shards": d.get("shards", []),
                "first_slices": d.get("first_slices", {}),
                "unlearn_s": d["seconds"],
                "wall_s": wall,
                "speedup_vs_full_retrain": full["seconds"] / d["seconds"] if d["seconds"] else None,
                "audit_clean": a["clean"],
                "live_versions_containing": sorted(a["live_versions_containing"]),
            }
        )
    acc_after = executor.test_accuracy()
    import ray

    # Ray prints the worker lines it held back as "[repeated Nx across cluster]" when it
    # shuts down: shut it down now, so they come before the report, not after it
    ray.shutdown()
    doc = {
        "run_id": ctx.run_id,
        "storage": ctx.storage.uri,
        "shards": cfg.partition.shards,
        "slices": cfg.partition.slices,
        "train_seconds": trained["train_seconds"],
        "accuracy_ensemble": acc_ensemble,
        "accuracy_single": acc_single,
        "single_model_train_s": single_s,
        "full_retrain_s": full["seconds"],
        "deletions": rows,
        "accuracy_after_deletions": acc_after,
        "seconds": time.perf_counter() - t_start,
    }
    return doc, _tables(doc)


def _tables(doc: dict[str, Any]) -> Group:
    acc = Table(title=f"run {doc['run_id']}: {doc['shards']} shards x {doc['slices']} slices")
    for col in ("model", "test accuracy", "train s"):
        acc.add_column(col)
    acc.add_row(
        "SISA ensemble (Ray Train job)",
        f"{doc['accuracy_ensemble']:.4f}",
        f"{doc['train_seconds']:.1f}",
    )
    acc.add_row(
        "one model on all data",
        f"{doc['accuracy_single']:.4f}",
        f"{doc['single_model_train_s']:.1f}",
    )
    acc.add_row("ensemble after the deletions", f"{doc['accuracy_after_deletions']:.4f}", "")
    dels = Table(
        title=f"owner deletions (full ensemble retrain: {doc['full_retrain_s']:.2f} s)",
        caption="shards and slices are numbered from 0, as in --json and in version names "
        "(s003-r02: shard 3, slice 2)",
    )
    for col in ("owner", "samples", "shard:first slice", "unlearn s", "speedup", "audit"):
        dels.add_column(col)
    for r in doc["deletions"]:
        where = ", ".join(f"{k}:{s}" for k, s in r["first_slices"].items()) or "(held-out only)"
        sp = r["speedup_vs_full_retrain"]
        dels.add_row(
            r["owner_id"],
            str(r["samples"]),
            where,
            f"{r['unlearn_s']:.3f}",
            f"{sp:.1f}x" if sp else "-",
            "clean: no live version holds it"
            if r["audit_clean"] and not r["live_versions_containing"]
            else f"FOUND in {r['live_versions_containing']}",
        )
    return Group(acc, dels)
