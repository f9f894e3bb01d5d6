"""A run's serving ensemble as an MLflow pyfunc model, registered with its lineage.

A sweep trial writes its ensemble (after its deletion stream) into its final Tune checkpoint
(:func:`export_ensemble`); the sweep registers the chosen trial's checkpoint in the MLflow
model registry (:func:`register_ensemble`), so ``mlflow.pyfunc.load_model("models:/<name>/
<version>")`` predicts as the gateway's ensemble does on versions with nothing pending.

The directory: ``ensemble.json`` (aggregation rule, shard -> version, the run's lineage) and
``shard_<k>.pt`` per live shard (the whole torch module, as the run's method serves it, so a
method's own serving model, say adapters on a backbone, needs no rebuilding code).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model

ENSEMBLE_FILE = "ensemble.json"  # also in pyfunc_model.py, which the loader imports


def lineage(ctx) -> dict[str, Any]:
    """Where the ensemble comes from: the run, the serving versions, and the deletion log's
    position (requests logged, done, and the latest request id, by time received)."""
    records = ctx.deletion_log.records()
    return {
        "run_id": ctx.run_id,
        "versions": {str(k): v for k, v in ctx.model_store.registry().serving_versions().items()},
        "deletion_log_requests": len(records),
        "deletion_log_done": sum(r.state.value == "done" for r in records),
        "deletion_log_last_request": records[-1].request_id if records else None,
    }


def export_ensemble(ctx, out: str | Path) -> dict[str, Any]:
    """Write the run's serving ensemble into ``out``; returns ``ensemble.json``'s content."""
    from ray_unlearn.platform.core.runtime import load_serving_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "rule": ctx.config.unlearning.aggregation,
        "feature_width": int(np.prod(ctx.feature_shape)),
        "num_classes": int(ctx.num_classes),
        # the loader predicts where a Serve replica of this run would (pyfunc_model.py)
        "training_device": ctx.config.training.device,
        **lineage(ctx),
    }
    cpu = torch.device("cpu")
    for k, vid in doc["versions"].items():
        # CPU tensors: the file loads anywhere (the loader maps them to its serving device)
        torch.save(load_serving_model(ctx, vid, cpu), out / f"shard_{k}.pt")
    (out / ENSEMBLE_FILE).write_text(json.dumps(doc, indent=2))
    return doc


def register_ensemble(
    client: mlflow.MlflowClient,
    ensemble_dir: str | Path,
    mlflow_run_id: str,
    model_name: str,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Log ``ensemble_dir`` as a pyfunc model on the MLflow run ``mlflow_run_id`` and
    register it as a new version of ``model_name``, tagged with its lineage (and ``tags``);
    returns {name, version, uri, model_uri}."""
    import ray_unlearn
    from ray_unlearn.tune.pyfunc_model import EnsembleModel

    doc = json.loads((Path(ensemble_dir) / ENSEMBLE_FILE).read_text())
    x = np.zeros((1, doc["feature_width"]), dtype=np.float32)
    # Every call goes through `client` (its tracking URI), none through MLflow's fluent API:
    # that reads the process-wide URI, and setting it (MLflow 3 also exports
    # MLFLOW_TRACKING_URI) would leak this store into the caller's later logging.
    run = client.get_run(mlflow_run_id)
    logged = client.create_logged_model(
        run.info.experiment_id, name="model", source_run_id=mlflow_run_id
    )
    with tempfile.TemporaryDirectory(prefix="ru-pyfunc-") as tmp:
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            local,
            python_model=EnsembleModel(),
            artifacts={"ensemble": str(ensemble_dir)},
            # the package travels with the model: the shard modules' classes live there
            code_paths=[str(Path(ray_unlearn.__file__).parent)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas"],
            input_example=x,
            mlflow_model=Model(
                artifact_path=logged.artifact_location,
                model_uuid=logged.model_id,
                model_id=logged.model_id,
                run_id=mlflow_run_id,
            ),
        )
        client.log_model_artifacts(logged.model_id, str(local))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(mlflow_run_id, [LoggedModelOutput(logged.model_id, step=0)])
    model_uri = f"models:/{logged.model_id}"
    try:
        client.create_registered_model(model_name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise  # not "a version of this model was registered before"
    # the source as the artifact location, not `models:/<id>`: MLflow's SQL registry resolves
    # the latter with a client of the global URI
    version = client.create_model_version(
        model_name, logged.artifact_location, run_id=mlflow_run_id, model_id=logged.model_id
    )
    lineage_tags = {
        "ray_unlearn.run_id": doc["run_id"],
        "ray_unlearn.versions": json.dumps(doc["versions"]),
        "ray_unlearn.deletion_log_requests": str(doc["deletion_log_requests"]),
        "ray_unlearn.deletion_log_done": str(doc["deletion_log_done"]),
        "ray_unlearn.deletion_log_last_request": str(doc["deletion_log_last_request"]),
        "ray_unlearn.aggregation": doc["rule"],
        **(tags or {}),
    }
    for k, v in lineage_tags.items():
        client.set_model_version_tag(model_name, version.version, k, v)
    return {
        "name": model_name,
        "version": version.version,
        "uri": f"models:/{model_name}/{version.version}",
        "model_uri": model_uri,
        "mlflow_run_id": mlflow_run_id,
    }


def register_chosen(
    client: mlflow.MlflowClient, model_name: str, sweep_id: str, best: dict[str, Any], ckpt
) -> dict[str, Any] | None:
    """Register a sweep's chosen trial's ensemble (its last Tune checkpoint) as a new
    version of the MLflow model ``model_name`` (the sweep's name), on the trial's child run,
    with its lineage. A failure is reported in the result (and on stderr), not raised: the
    sweep's results stand without it."""
    if ckpt is None or not best.get("mlflow_run_id"):
        return None
    try:
        with ckpt.as_directory() as d:
            return register_ensemble(
                client,
                d,
                best["mlflow_run_id"],
                model_name,
                tags={
                    "ray_unlearn.sweep_id": sweep_id,
                    "ray_unlearn.trial": best["label"][:5000],
                    "ray_unlearn.policy": best["policy"],
                },
            )
    except Exception as e:  # noqa: BLE001 - reported below, the sweep's results stand
        print(f"registering the chosen model failed: {type(e).__name__}: {e}", file=sys.stderr)
        return {"error": f"{type(e).__name__}: {e}"}
