"""`ray-unlearn forget --address` attached to a running executor stays light: the request
goes whole to the executor (which has the run open), and the command imports neither torch
nor the platform. Ray's cluster calls are replaced by stand-ins, so no cluster starts here;
the real round trip is tests/train/test_ray_integration.py's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# Runs `forget` in a fresh interpreter with ray.init/get_actor/get replaced; prints the
# command's exit code, the modules it imported and the executor call it made on stderr's
# last line (JSON).
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray

    MODE = sys.argv[1]
    calls = []

    class Method:
        def remote(self, *a, **kw):
            calls.append({"args": list(a), "kwargs": kw})
            return "ref"

    class Handle:
        forget_request = Method()

    def get_actor(name, namespace=None):
        calls.append({"get_actor": name, "namespace": namespace})
        if MODE == "no-executor":
            raise ValueError(f"Failed to look up actor with name {name!r}")
        return Handle()

    def get(ref):
        if MODE == "bad-owner":
            raise ray.exceptions.RayTaskError(
                "forget_request", "Traceback ...", ValueError("owner 'nobody' is not in run r")
            )
        return {
            "run_id": "r", "request_id": "q1", "created": True, "state": "done",
            "samples": 3, "logged_state": "pending", "ack_seconds": 0.01,
            "executed_by": "ray-unlearn-executor:r", "strategy": "sisa", "shards": [1],
            "first_slices": {"1": 0}, "versions_retired": ["a"], "versions_created": ["b"],
            "unlearn_seconds": 0.5, "history": [],
        }

    ray.init = lambda *a, **kw: calls.append({"init": kw})
    ray.is_initialized = lambda: False
    ray.get_actor = get_actor
    ray.get = get
    from ray_unlearn.cli import app

    code = 0
    try:  # without standalone mode, click returns the exit code of typer.Exit
        code = app(["forget", "--run", "r", "--owner", "nobody", "--storage", sys.argv[2],
             "--address", "127.0.0.1:6379", "--json"], standalone_mode=False) or 0
    except SystemExit as e:
        code = e.code
    # Ray's own imports aside (numpy, pyarrow: up to Ray's version), nothing of the platform
    heavy = [m for m in sys.modules if m in ("torch", "mlflow", "safetensors")
             or m.startswith(("ray_unlearn.platform", "ray_unlearn.train.executor"))]
    print(json.dumps({"code": code, "heavy": heavy, "calls": calls}), file=sys.stderr)
    """
)


def run_forget(mode: str, storage: str) -> tuple[dict, list[dict], str]:
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, storage], capture_output=True, text=True, timeout=120
    )
    report = json.loads(p.stderr.strip().splitlines()[-1])
    docs = [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]
    assert len(docs) == 1, p.stdout + p.stderr
    return report, docs, p.stderr


def test_forget_attached_to_a_running_executor_imports_no_torch(tmp_path):
    report, (doc,), stderr = run_forget("ok", str(tmp_path / "store"))
    assert report["code"] == 0
    assert report["heavy"] == [], "forget --address imported " + ", ".join(report["heavy"])
    (call,) = [c for c in report["calls"] if "kwargs" in c]
    # the storage root goes absolute: the executor compares it with its own
    assert call["args"] == [str((tmp_path / "store").resolve())]
    assert call["kwargs"]["owner_id"] == "nobody" and call["kwargs"]["sample_ids"] is None
    assert {"get_actor": "ray-unlearn-executor:r", "namespace": "ray_unlearn"} in report["calls"]
    assert doc["state"] == "done" and doc["request_id"] == "q1" and doc["seconds"] >= 0
    assert "request q1 logged (3 samples, state pending)" in stderr


def test_bad_input_found_by_the_executor_is_one_message_and_exit_2(tmp_path):
    report, (doc,), stderr = run_forget("bad-owner", str(tmp_path / "store"))
    assert report["code"] == 2
    assert doc == {"error": "owner 'nobody' is not in run r"}
    assert "Traceback" not in stderr


def test_without_a_running_executor_the_command_opens_the_run_itself(tmp_path):
    """No executor on the cluster: the command logs the request itself and would start
    one; here the run does not exist, which it says (exit 2) before anything starts."""
    report, (doc,), _ = run_forget("no-executor", str(tmp_path / "store"))
    assert report["code"] == 2
    assert "no run 'r' under storage root" in doc["error"]
    assert not any("kwargs" in c for c in report["calls"])


def test_the_executor_module_ray_loads_to_attach_imports_no_platform():
    """ray.get_actor rebuilds the executor's class in the client, importing its module: that
    module must import the platform (torch) only inside the actor's methods."""
    code = (
        "import json, sys; import ray_unlearn.train.executor; "
        "print(json.dumps(sorted(m for m in sys.modules if m in ('torch', 'mlflow', "
        "'safetensors') or m.startswith('ray_unlearn.platform'))))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []
