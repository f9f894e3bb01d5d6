"""`ray job submit` of a small train job against a head this test starts and stops.

The head is `ray start --head --block` in its own process group on 127.0.0.1 with free
ports, stopped by signalling that group (`ray stop` would end every Ray on the machine); a
start that fails under load is stopped the same way and retried once (see START_ATTEMPTS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ray_unlearn.harness import LocalRayHead, processes_of

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


# On a loaded 2-core machine (the suite's own Ray running beside it) `ray start --head` can
# fail by itself: node.py gives the raylet a fixed 30 s to register with the GCS ("The
# current node timed out during startup ... GCS has become overloaded"). So the head starts
# with fewer processes (no log monitor, no prestarted Python workers competing with the
# raylet), each attempt gets a long window, and a failed start is stopped, cleaned and
# retried once on fresh ports and a fresh session directory (LocalRayHead.start).
START_ATTEMPTS = 2
START_WINDOW_S = 240.0
HEAD_ENV = {
    "RAY_AUTH_MODE": "token",
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
}


@pytest.fixture
def ray_head():
    env = {**os.environ, **HEAD_ENV}
    head = LocalRayHead(
        dashboard=True, env=env, extra_args=["--include-log-monitor=false"], prefix="rj"
    )
    try:
        head.start(timeout=START_WINDOW_S, attempts=START_ATTEMPTS)
    except RuntimeError as e:
        pytest.fail(str(e))
    if head.failures:  # shown in pytest's warnings summary: a retry is evidence of load
        warnings.warn(f"ray start --head needed a retry: {head.failures[0][:500]}", stacklevel=1)
    temp = head.temp_dir
    try:
        yield head.dashboard_url, env
    finally:
        head.stop()
    # every process of that head is gone (they all name its temp dir), and no other Ray was
    # touched: nothing else was signalled
    assert not processes_of(temp), processes_of(temp)


# two start windows (2 x 240 s) plus the job's 480 s: more than the suite's 600 s default
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_ray_job_submit_trains_a_run(ray_head, tmp_path):
    address, env = ray_head
    store = tmp_path / "store"
    entry = [
        sys.executable, "-m", "ray_unlearn.cli", "train", "--json",
        "--config", str(REPO / "configs/digits.yaml"),
        f"storage={store}", "training.epochs=2", "partition.shards=2", "partition.slices=2",
        "model.hidden=[16]", "--run-id", "submitted",
    ]  # fmt: skip
    res = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--", *entry],
        capture_output=True,
        text=True,
        env=env,
        timeout=480,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "succeeded" in (res.stdout + res.stderr)
    # the job printed its one JSON document; the run is in the store, trained by Ray Train
    doc = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith('{"run_id"')))
    assert doc["run_id"] == "submitted" and doc["workers"] == 2 and doc["attached_cluster"]
    from ray_unlearn.platform.core.run import open_run

    ctx = open_run(str(store), "submitted")
    assert sorted(ctx.model_store.registry().shards) == [0, 1]
