"""`ray-unlearn forget --address` attached to a running executor stays light: the request
goes whole to the executor (which has the run open), and the command imports neither torch
nor the platform. Ray's cluster calls are replaced by stand-ins, so no cluster starts here;
the real round trip is tests/train/test_ray_integration.py's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

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


# `forget --address` with the run's executor control endpoint up: a server in this process
# (train/control.py's, in front of a stand-in for Executor.forget_request) and its file in
# the run's storage, as the detached executor publishes them. The command runs in a fresh
# interpreter, Ray untouched: it must not even import it.
ENDPOINT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from ray_unlearn.cli import app

    code = 0
    try:
        code = app(["forget", "--run", "r", "--owner", sys.argv[1], "--storage", sys.argv[2],
             "--address", "127.0.0.1:6379", "--request-id", "k1", "--deadline-s", "60",
             "--json"], standalone_mode=False) or 0
    except SystemExit as e:
        code = e.code
    heavy = [m for m in sys.modules if m in ("ray", "torch", "pyarrow")
             or m.startswith("ray_unlearn.platform")]
    print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
    """
)


def _endpoint(tmp_path):
    from ray_unlearn.platform.core.storage import RunLayout, Storage
    from ray_unlearn.train.control import ControlServer

    root = str((tmp_path / "store").resolve())
    calls = []

    def forget_request(storage_uri, owner_id, sample_ids, request_id, deadline, strategy):
        fields = {"owner_id": owner_id, "sample_ids": sample_ids, "request_id": request_id}
        calls.append({"storage": storage_uri, "deadline": deadline, "strategy": strategy, **fields})
        if fields["owner_id"] == "nobody":
            raise ValueError("owner 'nobody' is not in run r")
        return {
            "run_id": "r", "request_id": fields["request_id"], "created": True,
            "state": "done", "samples": 3, "logged_state": "pending", "ack_seconds": 0.01,
            "executed_by": "ray-unlearn-executor:r", "strategy": "sisa", "shards": [1],
            "first_slices": {"1": 0}, "versions_retired": ["a"], "versions_created": ["b"],
            "unlearn_seconds": 0.5, "history": [], "executor_seconds": 0.6,
        }  # fmt: skip

    server = ControlServer("127.0.0.1", forget_request, {"run_id": "r", "storage": root})
    server.start()
    Storage(root).write_json(RunLayout("r").executor_control, server.record())
    return server, root, calls


def _run_script(script: str, *args: str):
    """Run ``script`` in a fresh interpreter: (its import report, its one document, stderr)."""
    p = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120
    )
    report = json.loads(p.stderr.strip().splitlines()[-1])
    docs = [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]
    assert len(docs) == 1, p.stdout + p.stderr
    return report, docs[0], p.stderr


def _run_endpoint_forget(owner: str, root: str):
    return _run_script(ENDPOINT_SCRIPT, owner, root)


def test_forget_through_the_control_endpoint_imports_no_ray(tmp_path):
    server, root, calls = _endpoint(tmp_path)
    try:
        report, doc, stderr = _run_endpoint_forget("owner-1", root)
        assert report == {"code": 0, "heavy": []}, stderr
        ((call),) = calls
        assert call["storage"] == root and call["owner_id"] == "owner-1"
        assert call["sample_ids"] is None and call["request_id"] == "k1"
        assert call["strategy"] is None and 0 < call["deadline"] - time.time() <= 60
        assert doc["state"] == "done" and doc["request_id"] == "k1" and doc["seconds"] >= 0
        assert doc["executor_seconds"] == 0.6
        assert "request k1 logged (3 samples, state pending)" in stderr

        report, doc, stderr = _run_endpoint_forget("nobody", root)  # input error: exit 2
        assert report["code"] == 2 and doc == {"error": "owner 'nobody' is not in run r"}
        assert "Traceback" not in stderr and report["heavy"] == []
    finally:
        server.stop()


def test_a_stale_control_file_falls_back_to_ray(tmp_path):
    """The executor was killed: its file names a closed port. The command does not hang or
    trust it; it attaches through Ray as before (here Ray's stand-ins find the executor)."""
    server, root, calls = _endpoint(tmp_path)
    server.stop()
    t0 = time.perf_counter()
    report, (doc,), _ = run_forget("ok", root)
    assert report["code"] == 0 and doc["request_id"] == "q1" and calls == []
    assert {"get_actor": "ray-unlearn-executor:r", "namespace": "ray_unlearn"} in report["calls"]
    assert time.perf_counter() - t0 < 60


# `forget --no-wait --address` with the endpoint up: the real Executor.forget_request (on a
# run made here, untrained: logging needs only its plan) behind the in-process server, with
# an engine whose execution is counted. The command must log through it, import none of
# Ray, torch, pyarrow or the platform, and leave the request pending.
NO_WAIT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from ray_unlearn.cli import app

    code = 0
    try:
        code = app(["forget", "--run", sys.argv[1], "--owner", sys.argv[2], "--storage",
             sys.argv[3], "--address", "127.0.0.1:6379", "--request-id", "nw1", "--no-wait",
             "--json", *sys.argv[4:]], standalone_mode=False) or 0
    except SystemExit as e:
        code = e.code
    heavy = [m for m in sys.modules if m in ("ray", "torch", "pyarrow", "numpy")
             or m.startswith("ray_unlearn.platform")]
    print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
    """
)


def _executor_endpoint(tmp_path):
    """(server, run context, executions counted): the real ``Executor.forget_request`` of a
    stand-in executor (its run, a real engine whose executions are counted, its lock)."""
    import threading
    from functools import partial
    from types import SimpleNamespace

    from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
    from ray_unlearn.platform.core.run import create_run
    from ray_unlearn.train.control import ControlServer
    from ray_unlearn.train.executor import Executor
    from tests.conftest import tiny_config

    ctx = create_run(tiny_config(tmp_path))
    engine = UnlearningEngine(ctx, LocalShards(ctx), executor_name="ray-unlearn-executor:x")
    executions = []
    engine.execute_pending = lambda *a, **kw: executions.append(a) or []
    ex = SimpleNamespace(ctx=ctx, engine=engine, _lock=threading.RLock())
    identity = {"run_id": ctx.run_id, "storage": ctx.storage.uri}
    server = ControlServer("127.0.0.1", partial(Executor.forget_request, ex), identity).start()
    ctx.storage.write_json(ctx.layout.executor_control, server.record())
    return server, ctx, executions


def _run_no_wait(ctx, owner: str, *more: str):
    return _run_script(NO_WAIT_SCRIPT, ctx.run_id, owner, ctx.storage.uri, *more)


def _train_owners(ctx) -> list[str]:
    return sorted(set(ctx.plan.owner_ids[ctx.plan.shards >= 0].tolist()))


def test_forget_no_wait_is_logged_by_the_executor_and_not_executed(tmp_path):
    from ray_unlearn.platform.core.run import open_run

    server, ctx, executions = _executor_endpoint(tmp_path)
    owner = _train_owners(ctx)[0]
    try:
        report, doc, stderr = _run_no_wait(ctx, owner)
        assert report == {"code": 0, "heavy": []}, stderr
        assert doc["request_id"] == "nw1" and doc["created"] is True
        assert doc["state"] == doc["logged_state"] == "pending"
        assert doc["samples"] == len(ctx.plan.samples_of_owner(owner))
        assert doc["versions_created"] == [] and doc["executed_by"] is None
        assert doc["executor_seconds"] > 0 and doc["seconds"] >= 0
        assert f"request nw1 logged ({doc['samples']} samples, state pending)" in stderr
        # durable: another reader of the storage finds it, pending; nothing was executed
        rec = open_run(ctx.storage.uri, ctx.run_id).deletion_log.get("nw1")
        assert rec.state.value == "pending" and rec.request.owner_id == owner
        assert executions == []

        report, doc, _ = _run_no_wait(ctx, owner)  # the same key again: not a second request
        assert report["code"] == 0 and doc["created"] is False and executions == []
        assert [r.request.request_id for r in ctx.deletion_log.unfinished()] == ["nw1"]

        report, doc, stderr = _run_no_wait(ctx, "no-such-owner")  # the executor's input error
        assert report == {"code": 2, "heavy": []}
        assert "unknown owner id 'no-such-owner'" in doc["error"]
        assert "Traceback" not in stderr

        report, doc, _ = _run_no_wait(ctx, owner, "--strategy", "sisa")  # refused before
        assert report["code"] == 2 and doc["error"].startswith("strategy (--strategy) applies")
    finally:
        server.stop()


def test_forget_no_wait_without_an_endpoint_logs_in_the_client_without_ray(tmp_path, monkeypatch):
    """A stale control file (the executor was killed), or an executor from before ``wait``
    (its ping lists no such field): the command logs the request itself, as it always did
    with --no-wait, and never connects to Ray."""
    from ray_unlearn.platform.core.run import open_run
    from ray_unlearn.train import control

    server, ctx, executions = _executor_endpoint(tmp_path)
    owners = _train_owners(ctx)
    older = {k: v for k, v in control.FORGET_FIELDS.items() if k != "wait"}
    monkeypatch.setattr(control, "FORGET_FIELDS", older)  # what this server's ping lists
    try:
        report, doc, stderr = _run_no_wait(ctx, owners[0])
    finally:
        server.stop()
    assert report["code"] == 0, stderr
    assert "ray" not in report["heavy"] and "ray_unlearn.platform.core.engine" in report["heavy"]
    assert "executor_seconds" not in doc and doc["state"] == "pending"  # logged in the client
    assert executions == []
    report, doc, stderr = _run_no_wait(ctx, owners[1], "--request-id", "nw2")  # stale file
    assert report["code"] == 0 and "ray" not in report["heavy"], stderr
    log = open_run(ctx.storage.uri, ctx.run_id).deletion_log
    assert log.get("nw1").state.value == log.get("nw2").state.value == "pending"


def test_forget_no_wait_is_not_held_up_by_an_execution_in_progress(tmp_path):
    """An execution holds the executor's lock for minutes; a --no-wait request is only
    logged, as a client logging it itself would be then, and answers at once."""
    import threading

    from ray_unlearn.train.control import find_executor

    server, ctx, executions = _executor_endpoint(tmp_path)
    ex_lock = server.forget.args[0]._lock
    done = {}
    try:
        with ex_lock:  # the execution in progress
            call = threading.Thread(
                target=lambda: done.update(
                    find_executor(ctx.storage.uri, ctx.run_id).forget_request(
                        ctx.storage.uri, owner_id=_train_owners(ctx)[0], wait=False
                    )
                )
            )
            call.start()
            call.join(timeout=60)
            assert not call.is_alive() and done["state"] == "pending"
    finally:
        server.stop()
    assert executions == []
