"""The executor's HTTP control endpoint (train/control.py), without Ray: an in-process server
on 127.0.0.1 in front of a stand-in for ``Executor.forget_request``; the client as
``forget --address`` uses it. The real executor behind it: tests/train/test_ray_integration.py."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import time
from types import SimpleNamespace

import pytest

from ray_unlearn.platform.core.storage import RunLayout, Storage
from ray_unlearn.train import control
from ray_unlearn.train.control import (
    ControlClient,
    ControlServer,
    ExecutorFailed,
    ExecutorInputError,
    find_executor,
    read_control,
)

DOC = {"run_id": "r", "request_id": "q1", "created": True, "state": "done", "samples": 3}


class FakeExecutor:
    """``forget_request``: records its arguments; raises ``self.error`` if set."""

    def __init__(self):
        self.calls: list[dict] = []
        self.error: BaseException | None = None

    def forget_request(
        self, storage_uri, owner_id=None, sample_ids=None, request_id=None, deadline=None,
        strategy=None, wait=True,
    ):  # fmt: skip
        fields = {"owner_id": owner_id, "sample_ids": sample_ids, "request_id": request_id}
        fields.update(deadline=deadline, strategy=strategy)
        if not wait:  # recorded only when given: a client of any release omits the default
            fields["wait"] = wait
        self.calls.append({"storage": storage_uri, **fields})
        if self.error is not None:
            raise self.error
        return {**DOC, "owner": fields["owner_id"]}


@pytest.fixture
def served(tmp_path):
    """(executor stand-in, server, storage root): the server started and its control file
    published for run ``r`` as the executor publishes it."""
    root = str(tmp_path.resolve())
    ex = FakeExecutor()
    server = ControlServer("127.0.0.1", ex.forget_request, {"run_id": "r", "storage": root})
    server.start()
    Storage(root).write_json(RunLayout("r").executor_control, server.record())
    yield ex, server, root
    server.stop()


def _raw(server, method, path, body=b"", headers=None):
    """One raw HTTP call: (status, JSON body)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def _auth(server, **more):
    return {"Authorization": f"Bearer {server.token}", **more}


def test_the_control_file_path_is_the_layouts():
    assert control.control_path("run-1") == RunLayout("run-1").executor_control


def test_the_fields_are_the_executors_parameters():
    """POST /v1/forget calls Executor.forget_request(storage, **the rest): same names."""
    import inspect

    from ray_unlearn.train.executor import Executor

    # once a test has made Executor a Ray actor class, Ray's tracing helper has added its
    # own keyword-only parameter to the methods' signatures, in place
    params = [
        p for p in inspect.signature(Executor.forget_request).parameters if p != "_ray_trace_ctx"
    ]
    assert params == ["self", "storage_uri", *list(control.FORGET_FIELDS)[1:]]
    assert list(control.FORGET_FIELDS)[0] == "storage"


def test_a_forget_goes_through_with_every_field(served):
    ex, server, root = served
    client = find_executor(root, "r")
    assert client is not None
    doc = client.forget_request(
        root, owner_id="o1", sample_ids=None, request_id="k1", deadline=1.5e9, strategy="sisa"
    )
    assert doc == {**DOC, "owner": "o1"}
    assert ex.calls == [
        {
            "storage": root,
            "owner_id": "o1",
            "sample_ids": None,
            "request_id": "k1",
            "deadline": 1.5e9,
            "strategy": "sisa",
        }
    ]
    client.forget_request(root, owner_id=None, sample_ids=[4, 5], request_id=None)
    assert ex.calls[-1]["sample_ids"] == [4, 5] and ex.calls[-1]["owner_id"] is None


def test_wait_false_is_passed_and_announced_by_the_ping(served):
    """``forget --no-wait`` sends ``wait: false`` (and only to an executor whose ping lists
    it: an older one would refuse the field)."""
    ex, _, root = served
    client = find_executor(root, "r")
    assert client.accepts("wait") and client.ping["forget_fields"] == list(control.FORGET_FIELDS)
    assert not client.accepts("nothing")
    client.forget_request(root, owner_id="o1", request_id="k2", wait=False)
    assert ex.calls[-1] == {
        "storage": root, "owner_id": "o1", "sample_ids": None, "request_id": "k2",
        "deadline": None, "strategy": None, "wait": False,
    }  # fmt: skip
    assert not ControlClient(client.record).accepts("wait")  # not pinged: nothing known


def test_the_published_file_is_the_storages_own_kind_of_file(served):
    _, server, root = served
    path = os.path.join(root, RunLayout("r").executor_control)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # the storage's temp file + rename
    rec = read_control(root, "r")
    assert rec == server.record() and rec["url"].startswith("http://127.0.0.1:")
    assert len(rec["token"]) == 64


@pytest.mark.parametrize("token", [None, "Bearer wrong", "Basic abc"])
def test_a_missing_or_wrong_token_is_refused(served, token):
    ex, server, _ = served
    headers = {} if token is None else {"Authorization": token}
    body = json.dumps({"storage": "/x", "owner_id": "o"}).encode()
    assert _raw(server, "POST", "/v1/forget", body, headers)[0] == 401
    assert _raw(server, "GET", "/v1/ping", headers=headers)[0] == 401
    assert ex.calls == []


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"owner_id": "o"}', 400, "storage"),
        (b'{"storage": "/x", "owner": "o"}', 400, "unknown field(s) owner; allowed: storage"),
        (b'{"storage": "/x", "sample_ids": "1,2"}', 400, "sample_ids must be list or null"),
        (b'{"storage": "/x", "sample_ids": [1, "2"]}', 400, "integer sample ids"),
        (b'{"storage": "/x", "deadline": true}', 400, "deadline must be int or float or null"),
        (b'{"storage": "/x", "wait": 0}', 400, "wait must be bool, got 0"),
        (b'{"storage": "/x", "wait": null}', 400, "wait must be bool, got null"),
    ],
)
def test_a_malformed_body_is_a_4xx_with_the_message(served, body, status, message):
    ex, server, _ = served
    got, doc = _raw(server, "POST", "/v1/forget", body, _auth(server))
    assert got == status and message in doc["error"]
    assert ex.calls == []


def test_a_body_without_length_or_too_long_is_refused(served, monkeypatch):
    ex, server, _ = served
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:  # no Content-Length
        s.sendall(
            f"POST /v1/forget HTTP/1.1\r\nAuthorization: Bearer {server.token}\r\n\r\n".encode()
        )
        assert s.recv(4096).startswith(b"HTTP/1.1 411")
    monkeypatch.setattr(control, "MAX_BODY", 10)
    got, doc = _raw(server, "POST", "/v1/forget", b'{"storage": "/x"}', _auth(server))
    assert got == 413 and "0-10 bytes" in doc["error"]
    assert _raw(server, "POST", "/v1/nothing", b"{}", _auth(server))[0] == 404
    assert ex.calls == []


def test_input_errors_come_back_as_the_same_errors(served):
    ex, _, root = served
    client = find_executor(root, "r")

    class ConfigError(ValueError):
        problems = ["a", "b"]

    ex.error = ConfigError("owner 'nobody' is not in run r")
    with pytest.raises(ValueError, match="^owner 'nobody' is not in run r$") as e:
        client.forget_request(root, owner_id="nobody")
    assert isinstance(e.value, ExecutorInputError) and e.value.problems == ["a", "b"]
    assert e.value.remote_type.endswith("ConfigError")
    ex.error = FileNotFoundError(2, "No such file or directory", "/store/runs/r/plan.parquet")
    with pytest.raises(FileNotFoundError) as e:
        client.forget_request(root, owner_id="o")
    assert e.value.filename == "/store/runs/r/plan.parquet" and e.value.errno == 2
    ex.error = RuntimeError("a shard actor died")
    with pytest.raises(ExecutorFailed, match="HTTP 500: RuntimeError: a shard actor died"):
        client.forget_request(root, owner_id="o")
    ex.error = None  # and it still serves
    assert client.forget_request(root, owner_id="o")["state"] == "done"


def test_a_stale_file_is_not_followed(served, tmp_path):
    """A killed executor's file names a closed port: no client, at once (the caller takes
    the Ray path). So does a file whose server answers as another instance or another run,
    an unreadable file, and no file."""
    _, server, root = served
    assert find_executor(root, "other-run") is None  # no file
    rec = server.record()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    layout = RunLayout("r").executor_control
    store = Storage(root)
    for stale in (
        {**rec, "url": f"http://127.0.0.1:{closed}"},
        {**rec, "instance": "another-executor"},
        {**rec, "token": "old-token"},
        {**rec, "url": "ftp://127.0.0.1:1"},
    ):
        store.write_json(layout, stale)
        t0 = time.perf_counter()
        assert find_executor(root, "r") is None
        assert time.perf_counter() - t0 < 1.0
    store.write_bytes(layout, b'{"url": "http://127.0.0.1:1", "tok')  # half a file
    assert read_control(root, "r") is None and find_executor(root, "r") is None
    store.write_json(layout, rec)
    assert find_executor(str(tmp_path / "elsewhere"), "r") is None  # another storage root
    assert find_executor(root, "r") is not None


def test_a_ping_that_never_answers_times_out(monkeypatch):
    """A reused port whose server accepts and never answers: the ping gives up."""
    monkeypatch.setattr(control, "PING_TIMEOUT_S", 0.3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rec = {"url": f"http://127.0.0.1:{s.getsockname()[1]}", "token": "t", "instance": "i"}
        t0 = time.perf_counter()
        assert not ControlClient(rec).alive("r", "/x", timeout=control.PING_TIMEOUT_S)
        assert time.perf_counter() - t0 < 2.0


def test_an_executor_gone_mid_request_is_a_clear_failure(served):
    _, server, root = served
    client = find_executor(root, "r")
    server.stop()
    with pytest.raises(ExecutorFailed, match="stopped answering.*same --request-id"):
        client.forget_request(root, owner_id="o")


def test_the_executor_publishes_and_removes_its_file(tmp_path, monkeypatch):
    """start_control / Executor.close on a real run's storage (a stand-in executor: the Ray
    backend is not needed for this)."""
    from ray_unlearn.platform.core.run import create_run
    from ray_unlearn.train.executor import Executor, start_control
    from tests.conftest import tiny_config

    ctx = create_run(tiny_config(tmp_path))
    ex = SimpleNamespace(
        ctx=ctx,
        engine=SimpleNamespace(executor_name="ray-unlearn-executor:x"),
        forget_request=FakeExecutor().forget_request,
    )
    monkeypatch.setenv("RAY_UNLEARN_CONTROL_HOST", "off")
    assert start_control(ex) is None and not ctx.storage.exists(ctx.layout.executor_control)
    monkeypatch.setenv("RAY_UNLEARN_CONTROL_HOST", "127.0.0.1")
    ex._control = start_control(ex)
    try:
        client = find_executor(ctx.storage.uri, ctx.run_id)
        assert client is not None and client.record["executor"] == "ray-unlearn-executor:x"
        assert client.forget_request(ctx.storage.uri, owner_id="o")["state"] == "done"
    finally:
        Executor.close(ex)
    assert not ctx.storage.exists(ctx.layout.executor_control)
    assert find_executor(ctx.storage.uri, ctx.run_id) is None
    # a newer executor's file is left alone by an older one closing
    ex._control = start_control(ex)
    newer = {**ex._control.record(), "instance": "newer"}
    ctx.storage.write_json(ctx.layout.executor_control, newer)
    Executor.close(ex)
    assert ctx.storage.read_json(ctx.layout.executor_control) == newer
