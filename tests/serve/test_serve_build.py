"""Serve's own tooling: `serve build ray_unlearn.serve.app:app` writes a config that `serve
run` deploys (on the session's Ray, bound to 127.0.0.1) and that answers like the ensemble;
the app's errors without Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from ray_unlearn.harness import free_port
from ray_unlearn.serve.app import RUN_ENV, STORAGE_ENV, app_from_env, build_app, check_storage

TOKEN = "test-token-not-a-secret"
SERVE = str(Path(sys.executable).parent / "serve")


def test_relative_storage_and_missing_environment_are_refused_by_name():
    with pytest.raises(ValueError, match=r"storage './runs' is a relative path.*absolute"):
        build_app({"storage": "./runs", "run_id": "r"})
    with pytest.raises(ValueError, match=f"{STORAGE_ENV} 'runs' is a relative path"):
        app_from_env({STORAGE_ENV: "runs", RUN_ENV: "r"})
    with pytest.raises(ValueError, match=f"set {RUN_ENV} "):
        app_from_env({STORAGE_ENV: "/srv/runs"})
    with pytest.raises(ValueError, match=f"set {STORAGE_ENV} and {RUN_ENV}"):
        app_from_env({})
    assert check_storage("s3://bucket/unlearn") == "s3://bucket/unlearn"
    assert check_storage("~/runs") == os.path.expanduser("~/runs")


@pytest.mark.ray
def test_serve_build_output_deploys_with_serve_run(ray_session, tiny_run, tmp_path):
    import ray
    from ray import serve
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    from ray_unlearn.platform.core.aggregate import aggregate
    from ray_unlearn.platform.core.engine import LocalShards
    from ray_unlearn.train.executor import NAMESPACE, executor_actor_name

    ctx = tiny_run
    run_env = {STORAGE_ENV: ctx.storage.uri, RUN_ENV: ctx.run_id}
    env = {
        **os.environ,
        **run_env,
        "RAY_AUTH_MODE": "token" if is_token_auth_enabled() else "disabled",
    }
    out = tmp_path / "serve_app.yaml"
    r = subprocess.run(
        [SERVE, "build", "ray_unlearn.serve.app:app", "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    config = yaml.safe_load(out.read_text())
    (app_cfg,) = config["applications"]
    assert app_cfg["import_path"] == "ray_unlearn.serve.app:app"
    shards = sorted(ctx.model_store.registry().shards)
    assert {d["name"] for d in app_cfg["deployments"]} == {"gateway"} | {
        f"shard_{k}" for k in shards
    }
    # what docs/serving.md tells a user to edit: loopback, and the run (plus the API token)
    # in the application's runtime environment, since Serve re-imports the app on the cluster
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app_cfg["runtime_env"] = {"env_vars": {**run_env, "RAY_UNLEARN_API_TOKEN": TOKEN}}
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    gcs = ray.get_runtime_context().gcs_address
    try:
        r = subprocess.run(
            [SERVE, "run", str(out), "--address", gcs, "--non-blocking"],
            env={k: v for k, v in env.items() if k not in run_env},  # only the config's
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        health = httpx.get(f"{base}/healthz", timeout=10).json()
        assert health["run_id"] == ctx.run_id and health["live_shards"] == len(shards)
        x = ctx.split_records("test").features[:20]
        got = httpx.post(f"{base}/v1/predict", json={"instances": x.tolist()}, timeout=120)
        assert got.status_code == 200, got.text
        probs = LocalShards(ctx).predict_proba(x)  # shard -> (n, classes)
        want, _ = aggregate(
            np.stack([probs[k] for k in sorted(probs)]), ctx.config.unlearning.aggregation
        )
        assert [p["label"] for p in got.json()["predictions"]] == want.tolist()
        auth = {"Authorization": f"Bearer {TOKEN}"}  # the token reached the replicas
        assert httpx.get(f"{base}/v1/audit", headers=auth, timeout=60).status_code == 200
    finally:
        serve.shutdown()
        try:
            ray.kill(ray.get_actor(executor_actor_name(ctx.run_id), namespace=NAMESPACE))
        except ValueError:
            pass
