"""The registered model: a run's ensemble (after a deletion) logged as an MLflow pyfunc model
in a local SQLite store, registered with its lineage, loaded back by `models:/` URI, predicts
as the ensemble does. No Ray."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ray_unlearn.harness import pick_owners
from ray_unlearn.platform.core.aggregate import aggregate
from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
from ray_unlearn.tune.model_export import export_ensemble, register_ensemble


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """(client of a fresh SQLite store, artifact root, the store's URI), with MLflow's global
    tracking URI unset and the working directory empty: registering must reach the store
    through the client alone (a fluent call would create ./mlflow.db here)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return MlflowClient(uri), (tmp_path / "artifacts").as_uri(), uri


def test_registered_ensemble_loads_with_pyfunc_and_predicts_like_the_ensemble(
    tiny_run, tracking, tmp_path, monkeypatch
):
    ctx = tiny_run
    client, artifacts, uri = tracking
    before = ctx.model_store.registry().serving_versions()
    engine = UnlearningEngine(ctx, LocalShards(ctx), executor_name="test")
    (owner,) = pick_owners(ctx, 1, seed=0)
    engine.submit(owner_id=owner, request_id="gdpr-1")
    engine.execute_pending()

    exp = client.create_experiment("t", artifact_location=artifacts)
    run = client.create_run(exp, run_name="chosen-trial").info.run_id
    doc = export_ensemble(ctx, tmp_path / "ensemble")
    reg = register_ensemble(client, tmp_path / "ensemble", run, "ru-test", {"sweep": "s1"})
    assert reg["uri"] == "models:/ru-test/1"
    # no global left behind (MLflow 3's set_tracking_uri exports the variable), no default
    # store made in the working directory
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert list(Path.cwd().iterdir()) == []

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # how a user points pyfunc at the store
    model = mlflow.pyfunc.load_model(reg["uri"])
    x = ctx.split_records("test").features[:12].astype(np.float32)
    got = model.predict(x)
    probs = LocalShards(ctx).predict_proba(x)  # the run as it serves now, independently
    labels, scores = aggregate(np.stack([probs[k] for k in sorted(probs)]), doc["rule"])
    assert got["label"].tolist() == labels.tolist()
    assert np.allclose(got[[f"score_{c}" for c in range(scores.shape[1])]].to_numpy(), scores)
    with warnings.catch_warnings():  # a DataFrame reaches predict as a read-only array
        warnings.filterwarnings("error", message=".*not writable")
        frame = model.predict(pd.DataFrame(x))
    assert frame.equals(got)
    with pytest.raises(MlflowException, match=r"expected shape \(-1, 64\)"):  # the signature
        model.predict(x[:, :5])

    version = client.get_model_version("ru-test", "1")
    assert version.run_id == run
    serving = ctx.model_store.registry().serving_versions()
    assert json.loads(version.tags["ray_unlearn.versions"]) == {
        str(k): v for k, v in serving.items()
    }
    assert version.tags["ray_unlearn.run_id"] == ctx.run_id
    assert version.tags["ray_unlearn.deletion_log_requests"] == "1"
    assert version.tags["ray_unlearn.deletion_log_done"] == "1"
    assert version.tags["ray_unlearn.deletion_log_last_request"] == "gdpr-1"
    assert version.tags["sweep"] == "s1"
    assert serving != before  # what is registered is the model after the deletion
    # the next registration under that name is its version 2, the first one left as it was
    again = register_ensemble(client, tmp_path / "ensemble", run, "ru-test")
    assert again["uri"] == "models:/ru-test/2"
    assert client.get_model_version("ru-test", "1").tags["sweep"] == "s1"


class _Context:  # what MLflow hands load_context: the artifacts' local paths
    def __init__(self, d):
        self.artifacts = {"ensemble": str(d)}


def test_the_loader_maps_every_shard_to_its_serving_device(tiny_run, tmp_path, monkeypatch):
    """A shard module is loaded with map_location = the serving device, so one exported from
    a CUDA process loads on a CPU-only machine. (No GPU here: the meta device stands in for
    "another device" to show the storages go where the loader says, not where they were
    saved.) On the CPU the round trip is bit for bit: every weight and every prediction."""
    import torch

    from ray_unlearn.platform.core.runtime import load_serving_model
    from ray_unlearn.tune import pyfunc_model
    from ray_unlearn.tune.pyfunc_model import EnsembleModel

    ctx = tiny_run
    doc = export_ensemble(ctx, tmp_path / "ensemble")
    assert doc["training_device"] == ctx.config.training.device
    loaded = EnsembleModel()
    loaded.load_context(_Context(tmp_path / "ensemble"))
    assert len(loaded.models) == len(doc["versions"])
    x = ctx.split_records("test").features[:12]
    for k, m in zip(sorted(doc["versions"], key=int), loaded.models, strict=True):
        want = load_serving_model(ctx, doc["versions"][k])
        got_state, want_state = m.state_dict(), want.state_dict()
        assert got_state.keys() == want_state.keys()
        assert all(
            t.device.type == "cpu" and torch.equal(t, want_state[n]) for n, t in got_state.items()
        )
        with torch.no_grad():
            assert torch.equal(m(torch.from_numpy(x)), want(torch.from_numpy(x)))

    seen = []
    real_load = torch.load

    def recording_load(*args, **kw):
        seen.append(kw.get("map_location"))
        return real_load(*args, **kw)

    monkeypatch.setattr(torch, "load", recording_load)
    monkeypatch.setattr(pyfunc_model, "serving_device", lambda doc: torch.device("meta"))
    loaded = EnsembleModel()
    loaded.load_context(_Context(tmp_path / "ensemble"))
    assert seen == [torch.device("meta")] * len(doc["versions"])
    assert all(p.device.type == "meta" for m in loaded.models for p in m.parameters())


def test_the_serving_device_follows_the_runs_setting(monkeypatch):
    import torch

    from ray_unlearn.tune.pyfunc_model import serving_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert serving_device({"training_device": "cpu"}) == torch.device("cpu")
    assert serving_device({}) == torch.device("cpu")  # an older export: auto, no GPU here
