"""``ray-unlearn sweep``: Ray Tune over partitions, strategies and serving policies, every
trial logged to MLflow, ending in a Pareto front and a chosen config.

* Each trial is :func:`ray_unlearn.tune.trial.run_trial` in a Tune function trainable
  (:func:`ray_unlearn.tune.trainable.trainable`; 1 CPU; it trains in process, so no trial
  waits for a Train worker that could never be placed on a small machine), whose process
  trains under worker_env's OpenMP rule, as Train workers and Serve replicas do. It reports after every deletion of the stream, which is what
  the stopper (``stop.min_accuracy``) and ASHA (``stop.asha``) act on: both read
  ``val_accuracy``, measured on validation rows that are neither training nor test rows.
* MLflow: one parent run per sweep; every trial is a child run (tag
  ``mlflow.parentRunId``) with its full resolved run config as parameters (dotted keys,
  the serving policy once as ``serving.policy``), its metrics per deletion step and at the
  end, and its plot and run config as artifacts. The driver logs, as trials end (Tune callback),
  so one process writes the store. Tracking URI: ``mlflow.tracking_uri``, else
  ``$MLFLOW_TRACKING_URI``, else SQLite under the storage root (MLflow 3's file store is
  deprecated and refuses to start without an opt-in).
* Tune's search space: one grid/choice dimension per key, or, with ``search.variants``, one
  dimension over the grid's points (each a dict of keys), so no trial mixes two variants.
* Pareto front over ``pareto``'s three objectives (default: validation accuracy, unlearning
  CPU seconds, mean latency) among the trials that finished the stream without an exposure
  violation; each trial's ``test_accuracy`` is reported beside it and chooses nothing.
* Model registry: every trial's last report carries its serving ensemble as a Tune
  checkpoint; the chosen trial's is logged as an MLflow pyfunc model on its child run and
  registered as a new version of the model named after the sweep, tagged with its lineage
  (ray-unlearn run id, serving versions, deletion log position):
  ``mlflow.pyfunc.load_model("models:/<sweep name>/<version>")``.
* Result: ``<out>/results.json``, ``<out>/pareto.png``, ``<out>/chosen.yaml`` (a run config
  ``ray-unlearn train --config`` takes unchanged), also logged on the parent run. ``<out>``
  is ``<storage>/sweeps/<sweep id>`` for a local storage root; for an object-store root the
  files are written locally (``./sweeps/<sweep id>``) and uploaded there.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray import tune

from ray_unlearn.platform.core.config import config_to_yaml
from ray_unlearn.platform.core.storage import Storage
from ray_unlearn.tune.dedupe import planned, unique_points
from ray_unlearn.tune.pareto import choose, pareto_front, plot_front, plot_trial
from ray_unlearn.tune.spec import (
    POLICY_KEY,
    SweepSpec,
    dimensions,
    grid_points,
    trial_config,
    trial_policy,
)
from ray_unlearn.tune.trainable import POINT, trainable, trial_params

MLFLOW_DB = "mlflow/mlflow.db"
MLFLOW_ARTIFACTS = "mlflow/artifacts"


def _label(params: dict[str, Any], spec: SweepSpec | None = None) -> str:
    """A trial's name: the keys that vary across the sweep (last dotted part, unless two
    keys share it), so constants of a variant (its model, its epochs) stay out of it."""
    keys = list(params)
    if spec is not None:
        varying = {k for k, vals in dimensions(spec).items() if len(vals) > 1}
        keys = [k for k in keys if k in varying] or keys
    last = [k.split(".")[-1] for k in keys]
    names = [short if last.count(short) == 1 else k for k, short in zip(keys, last, strict=True)]
    return ",".join(f"{n}={params[k]}" for n, k in zip(names, keys, strict=True)) or "base"


def tracking(spec: SweepSpec, storage: Storage, create: bool = True) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None for the server's);
    ``create=False`` only checks (nothing is written)."""
    uri = spec.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    if not storage.local:
        raise ValueError(
            f"storage {storage.uri} is not a local directory, so MLflow cannot keep its "
            "SQLite store under it: set mlflow.tracking_uri in the sweep file, or "
            "MLFLOW_TRACKING_URI, to a tracking server (http://<host>:5000)"
        )
    db = storage.local_path(MLFLOW_DB)
    if create:
        db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}", storage.local_path(MLFLOW_ARTIFACTS).as_uri()


def preflight(spec: SweepSpec) -> None:
    """What would stop the sweep after Ray started, checked before (writes nothing)."""
    tracking(spec, Storage(spec.base["storage"]), create=False)


def _experiment(client: MlflowClient, name: str, artifacts: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifacts)


class Progress(tune.Callback):
    """One line per trial as it ends (on stderr): Tune's own tables run to ~50 lines a trial."""

    def __init__(self, spec: SweepSpec, total: int):
        self.spec, self.total, self.ended, self.t0 = spec, total, 0, time.perf_counter()

    def _line(self, trial, how: str) -> None:
        self.ended += 1
        r = trial.last_result or {}
        cost, lat = self.spec.pareto.cost, self.spec.pareto.latency

        def f(key: str, fmt: str) -> str:
            v = r.get(key)
            return "-" if v is None else format(v, fmt)

        print(
            f"[{self.ended}/{self.total} {time.perf_counter() - self.t0:6.0f}s] {how:8s} "
            f"{_label(trial_params(trial.config), self.spec)}: "
            f"val {f('val_accuracy', '.4f')} (test {f('test_accuracy', '.4f')}), "
            f"{cost} {f(cost, '.2f')}, "
            f"{lat} {f(lat, '.2f')}, after {f('deletions', 'd')} deletion(s)",
            file=sys.stderr,
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "finished" if (trial.last_result or {}).get("final") else "stopped")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, "FAILED")


class MlflowTrials(tune.Callback):
    """Logs every trial as a child run of the sweep's parent run, when it ends."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent: str, spec: SweepSpec):
        self.client, self.experiment_id, self.parent, self.spec = (
            client,
            experiment_id,
            parent,
            spec,
        )
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.runs: dict[str, str] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.history.setdefault(trial.trial_id, []).append(dict(result))

    def _log(self, trial, status: str, error: str | None = None) -> None:
        params = trial_params(trial.config)
        run = self.client.create_run(
            self.experiment_id,
            run_name=_label(params, self.spec),
            tags={
                "mlflow.parentRunId": self.parent,
                "ray_unlearn.sweep": self.spec.name,
                "ray_unlearn.trial_id": trial.trial_id,
            },
        )
        rid = run.info.run_id
        self.runs[trial.trial_id] = rid
        hist = self.history.get(trial.trial_id, [])
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, int(h.get("deletions", i)))
            for i, h in enumerate(hist)
            for k, v in h.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k in _LOGGED
        ]
        cfg = trial_config(self.spec, params)
        logged = config_params(cfg, trial_policy(self.spec, params))
        for i in range(0, len(logged), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(rid, params=logged[i : i + 100])
        for i in range(0, len(metrics), 900):  # ... and at 1000 metrics
            self.client.log_batch(rid, metrics=metrics[i : i + 900])
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "run_config.yaml").write_text(config_to_yaml(cfg))
            self.client.log_artifact(rid, str(Path(d) / "run_config.yaml"))
            if hist:
                png = Path(d) / "trial.png"
                plot_trial(hist, png, _label(params, self.spec))
                self.client.log_artifact(rid, str(png))
        if error:
            self.client.set_tag(rid, "error", error[:4000])
        self.client.set_terminated(rid, status)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._log(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._log(trial, "FAILED", str(getattr(trial, "error_msg", None) or "trial failed"))


_LOGGED = (
    "val_accuracy",
    "test_accuracy",
    "val_accuracy_before",
    "test_accuracy_before",
    "served_accuracy",
    "unlearn_s",
    "unlearn_cpu_s",
    "unlearn_s_per_deletion",
    "latency_mean_ms",
    "latency_p99_ms",
    "certified_fraction",
    "excluded_fraction",
    "waited_fraction",
    "rejected_fraction",
    "violations",
    "violation_fraction",
    "executions",
    "train_s",
)


_CHOSEN = (
    "val_accuracy",
    "test_accuracy",
    "served_accuracy",
    "unlearn_s",
    "unlearn_cpu_s",
    "latency_mean_ms",
    "latency_p99_ms",
)


def config_params(cfg, policy: str) -> list[Param]:
    """A trial's resolved run config as MLflow params: one per leaf, dotted keys
    (``training.epochs``), lists and nulls as JSON, plus the serving policy once
    (``serving.policy``); values cut at MLflow's 6000 characters."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = node

    walk("", cfg.model_dump(mode="json"))
    flat[POLICY_KEY] = policy
    return [Param(k, (v if isinstance(v, str) else json.dumps(v))[:6000]) for k, v in flat.items()]


def _param_space(spec: SweepSpec) -> dict[str, Any]:
    """One Tune dimension per key; with variants, or when some grid points repeat a trial
    (:mod:`ray_unlearn.tune.dedupe`), one dimension over the grid's distinct points (so a
    trial never mixes keys of two variants, and no trial runs twice)."""
    pick = tune.grid_search if spec.search.method == "grid" else tune.choice
    if spec.search.method == "grid":
        points, skipped = unique_points(spec)
        if spec.search.variants or skipped:
            return {POINT: pick(points)}
    elif spec.search.variants:
        return {POINT: pick(grid_points(spec))}
    return {k: pick(list(v)) for k, v in spec.search.space.items()}


def planned_trials(spec: SweepSpec) -> tuple[int, list[str]]:
    """(trials the sweep runs, one line per grid point skipped as a repeat of another)."""
    total, skipped = planned(spec)
    every = grid_points(spec) if skipped else []
    lines = [
        f"{_label(every[i], spec)} runs as {_label(every[j], spec)} (same config and policy)"
        for i, j in skipped
    ]
    return total, lines


def run_sweep(spec: SweepSpec, sweep_id: str | None = None) -> dict[str, Any]:
    """Run the sweep on the connected (or an embedded) Ray; returns the summary document.

    Everything is logged through one ``MlflowClient`` of the sweep's tracking URI (the
    callbacks, the model export): MLflow's process-wide URI is never set, since MLflow 3's
    ``set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``, which a later sweep in this
    process (another storage root) would take for the user's own setting."""
    t0 = time.perf_counter()
    preflight(spec)
    sweep_id = sweep_id or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    storage = Storage(spec.base["storage"])
    out = (
        storage.local_path(f"sweeps/{sweep_id}")
        if storage.local
        else Path("sweeps", sweep_id).resolve()
    )
    out.mkdir(parents=True, exist_ok=True)
    uri, artifacts = tracking(spec, storage)
    client = MlflowClient(uri)
    exp_id = _experiment(client, spec.mlflow.experiment, artifacts)
    parent = client.create_run(exp_id, run_name=sweep_id, tags={"ray_unlearn.sweep": spec.name})
    parent_id = parent.info.run_id
    client.log_batch(
        parent_id,
        params=[
            Param("sweep_file", spec.source or "-"),
            Param("trials", str(planned_trials(spec)[0])),
            Param("stream_deletions", str(spec.stream.deletions)),
            Param("space", json.dumps(dimensions(spec))[:6000]),
            Param("variants", str(len(spec.search.variants))),
            Param("method", spec.search.method),
            Param("pareto", ",".join(spec.pareto.objectives())),
        ],
    )
    logger = MlflowTrials(client, exp_id, parent_id, spec)
    total, skipped = planned_trials(spec)
    if skipped:
        print(
            f"{len(skipped)} grid point(s) skipped, each the same trial as another:\n  "
            + "\n  ".join(skipped),
            file=sys.stderr,
            flush=True,
        )

    min_acc = spec.stop.min_accuracy
    scheduler = None
    if spec.stop.asha:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            metric="val_accuracy",
            mode="max",
            time_attr="deletions",
            max_t=spec.stream.deletions,
            grace_period=1,
        )
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(trainable, spec_json=spec.model_dump(mode="json")), {"cpu": 1}
        ),
        param_space=_param_space(spec),
        tune_config=tune.TuneConfig(
            num_samples=spec.search.num_samples,
            max_concurrent_trials=spec.max_concurrent_trials,
            scheduler=scheduler,
        ),
        run_config=tune.RunConfig(
            name=sweep_id,
            storage_path=str(out / "tune")
            if storage.local
            else f"{storage.uri}/sweeps/{sweep_id}/tune",
            callbacks=[logger, Progress(spec, total)],
            stop=(lambda trial_id, result: result["val_accuracy"] < min_acc)
            if min_acc is not None
            else None,
            verbose=0,  # Progress prints a line per trial instead
            # keep_runs: the trial's working directory (its run) goes to its trial directory
            sync_config=tune.SyncConfig(sync_artifacts=spec.keep_runs),
        ),
    )
    status = "FINISHED"
    try:
        grid = tuner.fit()
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    rows: list[dict[str, Any]] = []
    checkpoints: list[Any] = []  # per row: its trial's last checkpoint (the ensemble), or None
    for res in grid:
        checkpoints.append(res.checkpoint)
        params = trial_params(res.config)
        m = res.metrics or {}
        row = {
            "label": _label(params, spec),
            "params": params,
            "policy": trial_policy(spec, params),
            "state": "error" if res.error else ("finished" if m.get("final") else "stopped early"),
            "error": str(res.error) if res.error else None,
            "mlflow_run_id": logger.runs.get(m.get("trial_id", ""), None),
        }
        for k in _LOGGED:
            row[k] = m.get(k)
        rows.append(row)
    objectives = spec.pareto.objectives()
    for r in rows:
        if r["state"] == "finished" and (r.get("violations") or 0) > 0:
            r["exposes_data"] = True
    # A trial that answered from a model holding data of a submitted deletion (checked
    # against the manifests, not the policy's labels) is shown, never chosen (unless the
    # sweep allows it): its latency is bought by breaking the deletion it was asked for.
    done = [
        r
        for r in rows
        if r["state"] == "finished" and (spec.pareto.allow_exposure or not r.get("exposes_data"))
    ]
    front_idx = pareto_front(done, objectives)
    front = [done[i] for i in front_idx]
    for r in rows:
        r["pareto"] = any(r is f for f in front)
    doc: dict[str, Any] = {
        "sweep_id": sweep_id,
        "out": str(out),
        "tracking_uri": uri,
        "experiment": spec.mlflow.experiment,
        "parent_run_id": parent_id,
        "objectives": {m: "max" if up else "min" for m, up in objectives.items()},
        "trials": rows,
        "skipped_duplicates": skipped,
        "pareto_front": [r["label"] for r in front],
    }
    if front:
        best = done[choose(done, front_idx, spec.select.metric, spec.select.mode, objectives)]
        chosen_cfg = trial_config(spec, best["params"]).model_copy(
            update={"name": f"{spec.name}-chosen"[:64]}
        )
        text = (
            f"# chosen by `ray-unlearn sweep` {sweep_id}: {best['label']}\n"
            f"# validation accuracy {best['val_accuracy']:.4f} (served "
            f"{best['served_accuracy']:.4f}; chosen on these), test accuracy "
            f"{best['test_accuracy']:.4f} (never selected on), "
            f"unlearning {best['unlearn_s']:.2f} s wall / {best['unlearn_cpu_s']:.2f} s CPU over "
            f"{spec.stream.deletions} deletions, serving latency {best['latency_mean_ms']:.2f} ms "
            f"mean / {best['latency_p99_ms']:.2f} ms p99\n"
            f"# serve it with: ray-unlearn serve --run <run-id> --policy {best['policy']}\n"
            + config_to_yaml(chosen_cfg)
        )
        (out / "chosen.yaml").write_text(text)
        doc["chosen"] = {**best, "config": str(out / "chosen.yaml")}
        plot_front(done, front_idx, out / "pareto.png", f"sweep {sweep_id}", objectives)
        ckpt = next(c for r, c in zip(rows, checkpoints, strict=True) if r is best)
        from ray_unlearn.tune.model_export import register_chosen

        doc["registered_model"] = register_chosen(client, spec.name, sweep_id, best, ckpt)
    else:
        status = "FAILED"
        doc["chosen"] = None
        doc["registered_model"] = None
    doc["seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
    for name in ("results.json", "pareto.png", "chosen.yaml"):
        if (out / name).exists():
            client.log_artifact(parent_id, str(out / name))
    if doc["chosen"]:
        best = doc["chosen"]
        client.log_batch(
            parent_id,
            metrics=[
                Metric(f"chosen_{k}", float(best[k]), int(time.time() * 1000), 0) for k in _CHOSEN
            ],
            params=[Param("chosen", best["label"][:6000]), Param("chosen_policy", best["policy"])],
        )
    client.set_terminated(parent_id, status)
    if not storage.local:
        storage.upload_dir(out, f"sweeps/{sweep_id}")
    return doc


__all__ = ["POLICY_KEY", "preflight", "run_sweep", "tracking"]
