"""A sweep leaves MLflow's tracking URI as it found it: it logs through its own client and
never sets the process-wide URI (MLflow 3's ``set_tracking_uri`` exports
MLFLOW_TRACKING_URI, so a later sweep in the process logged into this one's store).

No Ray: the real sweep body runs with Tune's entry points replaced by stand-ins (its Tuner
ends with no trial, or fails), so what it writes to MLflow is the real code's."""

from __future__ import annotations

import os
from types import SimpleNamespace

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ray_unlearn.tune import sweep
from ray_unlearn.tune.spec import load_sweep

DIGITS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "configs/digits.yaml"))


class _Tuner:
    """Tune's Tuner without Ray: ``fit`` returns no results, or raises ``fail``."""

    fail: Exception | None = None
    env_in_fit: str | None = None

    def __init__(self, trainable, **kwargs):
        self.kwargs = kwargs

    def fit(self):
        # what the trials (and Tune's callbacks) would see: the environment mid-sweep
        type(self).env_in_fit = os.environ.get("MLFLOW_TRACKING_URI", "unset")
        if self.fail is not None:
            raise self.fail
        return []


@pytest.fixture
def no_ray_tune(monkeypatch, tmp_path):
    fake = SimpleNamespace(
        Tuner=_Tuner,
        with_parameters=lambda fn, **kw: fn,
        with_resources=lambda fn, res: fn,
        grid_search=lambda values: {"grid_search": values},
        choice=lambda values: values,
        TuneConfig=dict,
        RunConfig=dict,
        SyncConfig=dict,
    )
    monkeypatch.setattr(sweep, "tune", fake)
    monkeypatch.setattr(_Tuner, "fail", None)
    monkeypatch.setattr(_Tuner, "env_in_fit", None)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # a fluent MLflow call would make ./mlflow.db here
    mlflow.set_tracking_uri(None)
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "t", "base_config": DIGITS, "search": {"space": {"partition.shards": [2]}}}
        )
    )
    return load_sweep(path, [f"storage={tmp_path / 'store'}"])


@pytest.mark.parametrize("before", [None, "users-own"])
def test_a_sweep_does_not_leave_its_store_as_the_next_ones(
    no_ray_tune, monkeypatch, tmp_path, before
):
    if before is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:  # the user's own store: the sweep logs there, and leaves the setting as it was
        before = f"sqlite:///{tmp_path / 'own.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", before)
    doc = sweep.run_sweep(no_ray_tune, "sweep-1")
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    assert _Tuner.env_in_fit == (before or "unset")  # not set even while the sweep runs
    # no default store in the working directory (with a bare SQLite URI of the user's,
    # MLflow keeps that store's artifacts in ./mlruns: its own default)
    assert "mlflow.db" not in os.listdir(".") and (before or os.listdir(".") == [])
    expected = before or f"sqlite:///{tmp_path / 'store' / 'mlflow' / 'mlflow.db'}"
    assert doc["tracking_uri"] == expected and doc["chosen"] is None  # no trial finished
    run = MlflowClient(expected).get_run(doc["parent_run_id"])
    assert run.info.run_name == "sweep-1" and run.info.status == "FAILED"


def test_the_uri_is_left_alone_when_the_sweep_fails(no_ray_tune, monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(_Tuner, "fail", ValueError("a trial's config is invalid"))
    with pytest.raises(ValueError, match="invalid"):
        sweep.run_sweep(no_ray_tune, "sweep-2")
    assert "MLFLOW_TRACKING_URI" not in os.environ and os.listdir(".") == []
    assert _Tuner.env_in_fit == "unset"
    client = MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name(no_ray_tune.mlflow.experiment).experiment_id]
    )
    assert run.info.status == "FAILED"
