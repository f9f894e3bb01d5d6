"""`ray job submit` of a small train job against a head this test starts and stops.

The head is `ray start --head --block` in its own process group on 127.0.0.1 with free
ports, stopped by signalling that group (`ray stop` would end every Ray on the machine); a
start that fails under load is stopped the same way and retried once (see START_ATTEMPTS)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# On a loaded 2-core machine (the suite's own Ray running beside it) `ray start --head` can
# fail by itself: node.py gives the raylet a fixed 30 s to register with the GCS ("The
# current node timed out during startup ... GCS has become overloaded"). So the head starts
# with fewer processes (no log monitor, no prestarted Python workers competing with the
# raylet), each attempt gets a long window, and a failed start is stopped, cleaned and
# retried once on fresh ports and a fresh session directory.
START_ATTEMPTS = 2
START_WINDOW_S = 240.0
HEAD_ENV = {
    "RAY_AUTH_MODE": "token",
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
}


def _start_head(temp: str, env: dict[str, str]) -> tuple[subprocess.Popen, str, str | None]:
    """Start one head; returns (process, dashboard address, None) once Ray says it runs, or
    (process, "", why) when it failed or the window passed."""
    log = Path(temp) / "head.log"
    dash = _free_port()
    ports = {
        "--port": _free_port(),
        "--ray-client-server-port": _free_port(),
        "--dashboard-port": dash,
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
    }
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
    cmd += ["--num-cpus=2", "--dashboard-host=127.0.0.1", "--disable-usage-stats"]
    cmd += ["--include-log-monitor=false"]
    cmd += [f"--temp-dir={temp}", *(f"{k}={v}" for k, v in ports.items())]
    proc = subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    t0 = time.monotonic()
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None:
            return proc, "", f"ray start exited {proc.returncode}:\n{log.read_text()[-2000:]}"
        if time.monotonic() - t0 > START_WINDOW_S:
            return proc, "", f"not started after {START_WINDOW_S:.0f} s:\n{log.read_text()[-2000:]}"
        time.sleep(0.5)
    return proc, f"http://127.0.0.1:{dash}", None


@pytest.fixture
def ray_head():
    env = {**os.environ, **HEAD_ENV}
    failures: list[str] = []
    for _attempt in range(START_ATTEMPTS):
        temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths are capped
        proc, address, why = _start_head(temp, env)
        if why is None:
            if failures:  # shown in pytest's warnings summary: a retry is evidence of load
                warnings.warn(f"ray start --head needed a retry: {failures[0][:500]}", stacklevel=1)
            break
        failures.append(why)
        _stop_head(proc, temp)
        assert not _processes_of(temp), _processes_of(temp)
        shutil.rmtree(temp, ignore_errors=True)
    else:
        pytest.fail(f"ray start --head failed {START_ATTEMPTS} times:\n" + "\n---\n".join(failures))
    try:
        yield address, env
    finally:
        _stop_head(proc, temp)
        shutil.rmtree(temp, ignore_errors=True)
    # every process of that head is gone (they all name its temp dir), and no other Ray was
    # touched: nothing else was signalled
    assert not _processes_of(temp), _processes_of(temp)


def _processes_of(temp: str) -> list[int]:
    """Pids whose command line names ``temp`` (this head's session directory)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and d.name != str(os.getpid()):
            try:
                if temp.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _stop_head(proc: subprocess.Popen, temp: str) -> None:
    """SIGTERM to the head's own process group (ray start --block, GCS, raylet, dashboard,
    workers), then SIGKILL to whatever of that group or that session is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)  # `ray start --block` itself waits ~30 s for stragglers
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # this test's own process group only
        proc.wait()
    deadline = time.time() + 15
    while _processes_of(temp) and time.time() < deadline:
        time.sleep(0.5)
    for pid in _processes_of(temp):  # a Ray process that left the group but names our session
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.5)


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
