"""A tiny sweep on the shared Ray session, read back from MLflow; its chosen config trained by
`ray-unlearn train` unchanged."""

from __future__ import annotations

import json
import logging
import os

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ray_unlearn.platform.core.config import load_config
from ray_unlearn.tune.spec import load_sweep, num_trials
from ray_unlearn.tune.sweep import run_sweep

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
DIGITS = os.path.abspath(os.path.join(CONFIGS, "digits.yaml"))

# Four trials, seconds each: SISA under a safe policy and under the naive baseline that
# exposes deleted data, the hybrid strategy, and S3T (one variant each).
TINY_SWEEP = {
    "name": "tiny",
    "base_config": DIGITS,
    "overrides": ["training.epochs=2", "model.hidden=[16]"],
    "search": {
        "space": {"partition.shards": [2]},
        "variants": [
            {
                "unlearning.strategy": ["sisa"],
                "partition.slices": [2],
                "serving.policy": ["lazy-exclude", "naive-postponed"],
            },
            {
                "unlearning.strategy": ["hs"],
                "hybrid.record": [True],
                "hybrid.threshold": [0.3],
                "serving.policy": ["immediate-wait"],
            },
            {
                "unlearning.strategy": ["s3t"],
                "model.hidden": [[16, 16, 16]],
                "partition.slices": [3],
                "s3t.budget": [2],
                "s3t.epochs": [1],
                "s3t.pretrain_epochs": [1],
                "serving.policy": ["immediate-wait"],
            },
        ],
    },
    "stream": {"deletions": 2, "seed": 0, "predictions": 20},
}


@pytest.mark.ray
def test_tiny_sweep_logs_every_trial_and_writes_a_trainable_choice(ray_session, tmp_path, caplog):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_SWEEP, sort_keys=False))
    store = tmp_path / "store"
    spec = load_sweep(path, [f"storage={store}"])
    assert num_trials(spec) == 4
    with caplog.at_level(logging.ERROR, logger="ray.tune"):
        doc = run_sweep(spec)
    # Tune saved its experiment state without error (trials once wrote their runs into the
    # directory it copies, and deleted them under it), and no trial's run went to storage
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert not list((store / "sweeps").glob("**/run.json")), "a trial run was uploaded"
    trials = {t["params"]["unlearning.strategy"] + "/" + t["policy"]: t for t in doc["trials"]}
    assert len(doc["trials"]) == 4 and all(t["state"] == "finished" for t in doc["trials"]), [
        (t["label"], t["state"], t["error"]) for t in doc["trials"]
    ]
    # the naive baseline answers from models holding data of submitted deletions (checked
    # against the manifests): shown, never chosen
    naive = trials["sisa/naive-postponed"]
    assert naive["violations"] > 0 and naive["exposes_data"] and not naive["pareto"]
    safe = [t for key, t in trials.items() if key != "sisa/naive-postponed"]
    assert all(t["violations"] == 0 and not t.get("exposes_data") for t in safe)
    # chosen on validation rows; test accuracy reported beside it, in results.json too
    assert all(0 <= t["test_accuracy"] <= 1 and 0 <= t["val_accuracy"] <= 1 for t in safe)
    assert trials["s3t/immediate-wait"]["params"]["s3t.budget"] == 2
    assert doc["pareto_front"] and doc["chosen"]["label"] in doc["pareto_front"]
    assert doc["chosen"]["policy"] != "naive-postponed"
    assert doc["objectives"] == {
        "val_accuracy": "max",
        "unlearn_cpu_s": "min",
        "latency_mean_ms": "min",
    }
    out = doc["out"]
    assert os.path.getsize(os.path.join(out, "pareto.png")) > 0
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["chosen"]["test_accuracy"] == doc["chosen"]["test_accuracy"]
    assert "val_accuracy" in saved["chosen"]
    with open(doc["chosen"]["config"]) as f:
        header = f.read().split("\n", 3)[1]
    assert "validation accuracy" in header and "test accuracy" in header

    # MLflow (SQLite under the storage root): one parent, four children
    assert doc["tracking_uri"] == f"sqlite:///{store / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(doc["tracking_uri"])
    exp = client.get_experiment_by_name(spec.mlflow.experiment)
    parent = client.get_run(doc["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["chosen"]
    assert {"chosen_val_accuracy", "chosen_test_accuracy"} <= set(parent.data.metrics)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "results.json",
        "pareto.png",
        "chosen.yaml",
    }
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    assert {c.info.run_id for c in children} == {t["mlflow_run_id"] for t in doc["trials"]}
    for run in children:
        assert run.info.status == "FINISHED"
        params = run.data.params  # the full resolved config, the policy once
        assert {"partition.shards", "unlearning.strategy", "serving.policy"} <= set(params)
        assert params["training.epochs"] == "2" and "data.test_fraction" in params
        assert "policy" not in params
        assert {
            "val_accuracy",
            "test_accuracy",
            "served_accuracy",
            "unlearn_s",
            "unlearn_cpu_s",
            "latency_mean_ms",
            "certified_fraction",
            "violations",
        } <= set(run.data.metrics)
        steps = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in steps] == [1, 2]
        # (MLflow 3 keeps a logged model apart from the run's artifacts)
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
            "run_config.yaml",
            "trial.png",
        }

    # the chosen trial's ensemble, registered with its lineage
    reg = doc["registered_model"]
    assert reg["uri"] == f"models:/{spec.name}/1", reg
    version = client.get_model_version(spec.name, reg["version"])
    assert version.run_id == doc["chosen"]["mlflow_run_id"]
    assert version.tags["ray_unlearn.sweep_id"] == doc["sweep_id"]
    assert version.tags["ray_unlearn.deletion_log_requests"] == "2"  # the stream's two
    assert json.loads(version.tags["ray_unlearn.versions"])

    # the chosen config is a run config that `ray-unlearn train` takes unchanged
    from typer.testing import CliRunner

    from ray_unlearn.cli import app
    from ray_unlearn.platform.core.run import open_run

    chosen = load_config(doc["chosen"]["config"], [])
    assert chosen.partition.shards == doc["chosen"]["params"]["partition.shards"]
    assert chosen.storage == str(store)
    res = CliRunner().invoke(
        app, ["train", "--config", doc["chosen"]["config"], "--run-id", "chosen"]
    )
    assert res.exit_code == 0, res.output
    ctx = open_run(str(store), "chosen")
    assert ctx.config.unlearning.strategy == chosen.unlearning.strategy
    assert len(ctx.model_store.registry().serving_versions()) == chosen.partition.shards


@pytest.mark.ray
def test_hopeless_trials_stop_early(ray_session, tmp_path):
    spec = load_sweep(
        os.path.join(CONFIGS, "sweep.yaml"),
        [
            f"storage={tmp_path / 'store'}",
            "training.epochs=1",
            "model.hidden=[8]",
            "search.variants=[]",
            "space.partition.shards=[2]",
            "space.partition.slices=[2]",
            "space.serving.policy=[lazy-exclude]",
            "stream.deletions=3",
            "stream.predictions=10",
            "stop.min_accuracy=1.0",  # nothing reaches it: stopped after the first deletion
        ],
    )
    doc = run_sweep(spec)
    (trial,) = doc["trials"]
    assert trial["state"] == "stopped early" and doc["chosen"] is None
    history = MlflowClient(doc["tracking_uri"]).get_metric_history
    runs = history(trial["mlflow_run_id"], "val_accuracy")
    assert len(runs) == 1


@pytest.mark.parametrize("keep", [False, True])
def test_trial_measures_the_stream_and_keeps_its_run_only_if_asked(tmp_path, keep):
    from ray_unlearn.tune.trial import run_trial

    spec = load_sweep(
        os.path.join(CONFIGS, "sweep.yaml"),
        ["training.epochs=1", "model.hidden=[8]", "stream.deletions=2", f"keep_runs={keep}"],
    )
    reports = []
    params = {
        "partition.shards": 2,
        "partition.slices": 2,
        "serving.policy": "immediate-wait",
    }
    m = run_trial(spec, params, tmp_path, report=reports.append)
    assert [r["deletions"] for r in reports] == [1, 2] and reports[-1]["final"]
    assert m["executions"] == 2 and m["unlearn_s"] > 0 and m["unlearn_cpu_s"] > 0
    assert 0 <= m["val_accuracy"] <= 1 and 0 <= m["served_accuracy"] <= 1
    assert 0 <= m["test_accuracy"] <= 1
    assert m["violations"] == 0 and m["rejected_fraction"] == 0
    # every instance is certified, or waits for its shard and is answered afterwards
    assert m["certified_fraction"] + m["waited_fraction"] == pytest.approx(1.0)
    assert (tmp_path / "store").exists() == keep
