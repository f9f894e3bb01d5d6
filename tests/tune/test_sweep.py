"""A tiny sweep on the shared Ray session, read back from MLflow."""

from __future__ import annotations

import os

import pytest
from mlflow.tracking import MlflowClient

from ray_unlearn.platform.config import load_config
from ray_unlearn.tune.spec import load_sweep
from ray_unlearn.tune.sweep import run_sweep

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


@pytest.mark.ray
def test_tiny_sweep_logs_every_trial_and_writes_a_trainable_choice(ray_session, tmp_path):
    spec = load_sweep(
        os.path.join(CONFIGS, "sweep.yaml"),
        [
            f"storage={tmp_path / 'store'}",
            "training.epochs=2",
            "model.hidden=[16]",
            "space.partition.shards=[2,3]",
            "space.partition.slices=[2]",
            "space.serving.policy=[double-lazy-exclude,single-immediate-wait]",
            "stream.deletions=2",
            "stream.predictions=20",
            "stop.min_accuracy=null",
        ],
    )
    doc = run_sweep(spec)
    assert len(doc["trials"]) == 4 and all(t["state"] == "finished" for t in doc["trials"])
    assert doc["pareto_front"] and doc["chosen"]["label"] in doc["pareto_front"]
    # MLflow: one parent, four children with params, per-step metrics and artifacts
    assert doc["tracking_uri"].startswith("sqlite:///") and str(tmp_path) in doc["tracking_uri"]
    client = MlflowClient(doc["tracking_uri"])
    exp = client.get_experiment_by_name(spec.mlflow.experiment)
    parent = client.get_run(doc["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["chosen"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "results.json",
        "pareto.png",
        "chosen.yaml",
    }
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    for run in children:
        assert run.info.status == "FINISHED"
        assert {"partition.shards", "partition.slices", "serving.policy", "policy"} <= set(
            run.data.params
        )
        assert {"accuracy", "unlearn_s", "latency_mean_ms", "certified_fraction"} <= set(
            run.data.metrics
        )
        steps = client.get_metric_history(run.info.run_id, "accuracy")
        assert [m.step for m in steps] == [1, 2]
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
            "run_config.yaml",
            "trial.png",
        }
    # the chosen config is a run config `ray-unlearn train` accepts unchanged
    chosen = load_config(doc["chosen"]["config"], [])
    assert chosen.partition.shards == doc["chosen"]["params"]["partition.shards"]


@pytest.mark.ray
def test_hopeless_trials_stop_early(ray_session, tmp_path):
    spec = load_sweep(
        os.path.join(CONFIGS, "sweep.yaml"),
        [
            f"storage={tmp_path / 'store'}",
            "training.epochs=1",
            "model.hidden=[8]",
            "space.partition.shards=[2]",
            "space.partition.slices=[2]",
            "space.serving.policy=[double-lazy-exclude]",
            "stream.deletions=3",
            "stream.predictions=10",
            "stop.min_accuracy=1.0",  # nothing reaches it: stopped after the first deletion
        ],
    )
    doc = run_sweep(spec)
    (trial,) = doc["trials"]
    assert trial["state"] == "stopped early" and doc["chosen"] is None
    runs = MlflowClient(doc["tracking_uri"]).get_metric_history(trial["mlflow_run_id"], "accuracy")
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
        "serving.policy": "single-immediate-wait",
    }
    m = run_trial(spec, params, tmp_path, report=reports.append)
    assert [r["deletions"] for r in reports] == [1, 2] and reports[-1]["final"]
    assert m["executions"] == 2 and m["unlearn_s"] > 0 and 0 <= m["accuracy"] <= 1
    assert (tmp_path / "store").exists() == keep
