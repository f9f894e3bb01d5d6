"""One sweep trial, in process: train a run, run the seeded deletion stream, measure.

The run's held-out rows are split in two by sample id (``stream.validation_fraction`` of
them, seeded: :func:`held_out_split`): *validation* rows, which every selection, ranking and
early stop of the sweep reads, and *test* rows, reported beside them and read by nothing that
chooses. Training rows stay as they are, so the chosen config trains exactly as it did in its
trial. S3T's accuracy trigger measures the same hash of the same rows, so its validation rows
are validation rows here too, never test rows (the sweep checks the fractions).

Measured per trial (and reported after every deletion step, so early stopping can act):

* ``val_accuracy`` / ``test_accuracy``: accuracy of the serving ensemble (after the
  deletions so far) on the validation / test rows (rows of deleted owners left out);
* ``unlearn_s`` / ``unlearn_cpu_s``: wall / CPU seconds of executing the deletions
  (``UnlearningEngine.execute_pending``; S3T: deactivation, plus any depth restoration).
  CPU seconds are the trial process's own (every thread: torch's intra-op threads count),
  so they measure the computation spent on unlearning and, unlike wall seconds, barely move
  when other work shares the machine's cores;
* ``served_accuracy``: accuracy of the answers the policy actually gave on the probe
  instances, drawn from the validation rows (an excluded answer comes from the unaffected
  shards only; a waited one from the ensemble after the execution it waited for; rejected
  instances are left out);
* ``violations`` / ``violation_fraction``: answers computed by a shard whose model holds a
  sample of a deletion already submitted, checked from outside the decision code
  (:mod:`ray_unlearn.tune.exposure`: the shards queried for the answer, the registry at that
  moment, the versions' sample lists and the deletion log); ``rejected_fraction``: instances
  refused (503) under a ``reject`` policy;
* ``latency_mean_ms`` / ``latency_p99_ms`` / ``certified_fraction``: serving under the
  trial's ERASER policy, measured in process with the gateway's own decision code
  (:func:`ray_unlearn.platform.serving.view.answer_batch`). At each deletion step the request is
  logged as pending and ``stream.predictions`` validation instances are answered, querying
  only the shards the gateway would (:func:`ray_unlearn.platform.serving.view.shards_to_query`):
  an instance's latency is its share of those shards' prediction time, plus, when the policy
  makes it wait, the measured time of the execution it waits for. Executions happen when
  the policy's timing says so (immediate: every step; batched: every ``batch_count``
  requests; lazy: when an instance waits, and at the end). No HTTP and no Ray Serve: this
  ranks policies and partitions against each other cheaply; ``benchmarks/serving.py``
  measures the real gateway.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ray_unlearn.harness import pick_owners
from ray_unlearn.platform.core.aggregate import aggregate
from ray_unlearn.platform.core.data import held_out_mask
from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
from ray_unlearn.platform.core.run import RunContext, create_run
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.core.training import derive_seed
from ray_unlearn.platform.eval.accuracy import VALIDATION_STREAM, ensemble_accuracy
from ray_unlearn.platform.serving.policies import get_policy
from ray_unlearn.platform.serving.view import DeletionTracker, answer_batch, shards_to_query
from ray_unlearn.tune.exposure import ExposureCheck
from ray_unlearn.tune.spec import SweepSpec, trial_config, trial_policy

Reporter = Callable[[dict[str, Any]], None]


def held_out_split(ctx: RunContext, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(validation ids, test ids): the held-out rows whose seeded hash of the sample id is
    below ``fraction`` (the hash S3T's validation rows use, same seed), and the rest.

    Carved from the held-out rows rather than the training rows so that every trial, and
    the chosen config trained again, fits exactly the rows it would fit outside a sweep.
    Raises ValueError when either side is empty (too few held-out rows for the fraction).
    """
    held = ctx.split_records("test").sample_ids
    val = held_out_mask(held, fraction, derive_seed(ctx.config.seed, VALIDATION_STREAM))
    if val.all() or not val.any():
        raise ValueError(
            f"stream.validation_fraction={fraction} leaves {int(val.sum())} validation and "
            f"{int((~val).sum())} test rows of the run's {len(held)} held-out rows; both "
            "need some (raise data.test_fraction, or choose a fraction nearer 0.5)"
        )
    return held[val], held[~val]


def _accuracy(ctx: RunContext, backend: LocalShards, ids: np.ndarray) -> float:
    """Ensemble accuracy on the rows ``ids`` whose deletion is not done yet."""
    deleted = np.fromiter(ctx.deletion_log.deleted_sample_ids(), dtype=np.int64)
    ids = ids[~np.isin(ids, deleted)]
    rows = ctx.records.subset(ctx.records.index_of(ids))
    return ensemble_accuracy(
        backend.predict_proba(rows.features), rows.labels, ctx.config.unlearning.aggregation
    )


def _query(backend: LocalShards, shards: list[int], x: np.ndarray) -> dict[int, np.ndarray]:
    """shard -> (n, classes) from the given shards' current models (empty shards skipped):
    the keys are the shards whose models an answer can depend on."""
    out = {k: backend.shard(k).predict_proba(x) for k in shards}
    return {k: p for k, p in out.items() if p is not None}


def run_trial(
    spec: SweepSpec,
    params: dict[str, Any],
    workdir: str | Path,
    report: Reporter | None = None,
    export_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train, stream deletions, measure; returns the final metrics (also passed to
    ``report`` after every deletion step, with ``final`` set on the last one). With
    ``export_dir``, the serving ensemble after the stream is written there before the last
    report (:func:`ray_unlearn.tune.model_export.export_ensemble`: the sweep registers the
    chosen trial's in MLflow)."""
    workdir = Path(workdir)
    cfg = trial_config(spec, params, storage=str(workdir / "store"))
    policy = get_policy(trial_policy(spec, params))
    ctx = create_run(cfg)
    t0 = time.perf_counter()
    train_all_shards(ctx)
    train_s = time.perf_counter() - t0
    backend = LocalShards(ctx)
    engine = UnlearningEngine(ctx, backend, executor_name="sweep-trial")
    rule = cfg.unlearning.aggregation
    val_ids, test_ids = held_out_split(ctx, spec.stream.validation_fraction)
    val_before, test_before = _accuracy(ctx, backend, val_ids), _accuracy(ctx, backend, test_ids)
    probe = np.random.default_rng([spec.stream.seed, 1]).choice(
        val_ids, size=min(spec.stream.predictions, len(val_ids)), replace=False
    )
    probe_rows = ctx.records.subset(ctx.records.index_of(np.sort(probe)))
    x, y = probe_rows.features, probe_rows.labels

    tracker = DeletionTracker(ctx.plan)
    exposure = ExposureCheck(ctx)
    latencies: list[np.ndarray] = []
    modes: dict[str, int] = {}
    served_right = served = violations = 0
    unlearn_s = unlearn_cpu_s = 0.0
    executions = 0

    def execute() -> float:
        nonlocal unlearn_s, unlearn_cpu_s, executions
        t, c = time.perf_counter(), time.process_time()
        done = engine.execute_pending()
        dt, dc = time.perf_counter() - t, time.process_time() - c
        if done:
            executions += 1
            unlearn_s += dt
            unlearn_cpu_s += dc
        tracker.sync(ctx.deletion_log.unfinished())
        return dt

    owners = pick_owners(ctx, spec.stream.deletions, spec.stream.seed)
    metrics: dict[str, Any] = {}
    for step, owner in enumerate(owners, start=1):
        record, _ = engine.submit(owner_id=owner)
        tracker.add(record)
        # serve the probe batch while the deletion(s) are pending, querying only the shards
        # the gateway would query
        live = [k for k in backend.shard_ids if not backend.shard(k).empty]
        affected = tracker.affected()
        t = time.perf_counter()
        probs = _query(backend, shards_to_query(policy, live, affected), x)
        predict_s = time.perf_counter() - t
        answers = answer_batch(policy, rule, live, affected, probs, n=len(y), pending=True)
        # every answer given now was computed from (at most) the shards queried
        now = [i for i, a in enumerate(answers) if a.mode not in ("wait", "reject")]
        if now and exposure.holding_submitted(probs):
            violations += len(now)
        waiting = [i for i, a in enumerate(answers) if a.mode == "wait"]
        due = (
            policy.timing == "immediate"
            or (policy.timing == "batched" and len(tracker.items) >= (policy.batch_count or 1))
            or bool(waiting)
            or step == len(owners)
        )
        wait_s = execute() if due else 0.0
        lat = np.full(len(y), predict_s / len(y))
        labels = np.array([-1 if a.label is None else a.label for a in answers])
        if waiting:  # answered again, by the ensemble after the execution they waited for
            t = time.perf_counter()
            after = backend.predict_proba(x[waiting])
            again_s = time.perf_counter() - t
            labels[waiting] = aggregate(np.stack([after[k] for k in sorted(after)]), rule)[0]
            lat[waiting] += wait_s + again_s / len(waiting)
            if exposure.holding_submitted(after):
                violations += len(waiting)
        answered = np.array([a.mode != "reject" for a in answers], dtype=bool)
        served += int(answered.sum())
        served_right += int((labels[answered] == y[answered]).sum())
        for a in answers:
            mode = "waited" if a.mode == "wait" else a.mode
            modes[mode] = modes.get(mode, 0) + 1
        latencies.append(lat * 1000)
        all_lat = np.concatenate(latencies)
        n = sum(modes.values())
        metrics = {
            "step": step,
            "val_accuracy": _accuracy(ctx, backend, val_ids),
            "test_accuracy": _accuracy(ctx, backend, test_ids),
            "val_accuracy_before": val_before,
            "test_accuracy_before": test_before,
            "unlearn_s": unlearn_s,
            "unlearn_cpu_s": unlearn_cpu_s,
            "unlearn_s_per_deletion": unlearn_s / step,
            "latency_mean_ms": float(all_lat.mean()),
            "latency_p99_ms": float(np.percentile(all_lat, 99)),
            "served_accuracy": served_right / served if served else 0.0,
            "certified_fraction": modes.get("certified", 0) / n,
            "excluded_fraction": modes.get("excluded", 0) / n,
            "waited_fraction": modes.get("waited", 0) / n,
            "rejected_fraction": modes.get("reject", 0) / n,
            "violations": violations,
            "violation_fraction": violations / n,
            "executions": executions,
            "train_s": train_s,
            "deletions": step,
            "final": step == len(owners),
        }
        if export_dir is not None and metrics["final"]:
            from ray_unlearn.tune.model_export import export_ensemble

            export_ensemble(ctx, export_dir)
        if report is not None:
            report(dict(metrics))
    metrics["run_id"] = ctx.run_id
    metrics["policy"] = policy.name
    if not spec.keep_runs:
        shutil.rmtree(workdir / "store", ignore_errors=True)
    return metrics
