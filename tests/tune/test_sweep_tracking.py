"""A sweep leaves MLflow's tracking URI as it found it (no Ray: the sweep body is replaced
by one that sets the URI as the real one does)."""

from __future__ import annotations

import os

import mlflow
import pytest

from ray_unlearn.tune import sweep


@pytest.mark.parametrize("before", [None, "sqlite:////tmp/users-own/mlflow.db"])
def test_a_sweep_does_not_leave_its_store_as_the_next_ones(monkeypatch, tmp_path, before):
    if before is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", before)

    def body(spec, sweep_id):
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")  # as _run_sweep does
        assert os.environ["MLFLOW_TRACKING_URI"].startswith("sqlite:///")  # MLflow 3 exports it
        return {"ok": True}

    monkeypatch.setattr(sweep, "_run_sweep", body)
    assert sweep.run_sweep(None) == {"ok": True}
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    mlflow.set_tracking_uri(None)


def test_the_uri_is_restored_when_the_sweep_fails(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def body(spec, sweep_id):
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        raise ValueError("a trial's config is invalid")

    monkeypatch.setattr(sweep, "_run_sweep", body)
    with pytest.raises(ValueError, match="invalid"):
        sweep.run_sweep(None)
    assert "MLFLOW_TRACKING_URI" not in os.environ
