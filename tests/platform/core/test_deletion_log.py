"""The deletion log: state machine, idempotency, validation, crash durability, concurrency.

The crash and concurrency tests run real writer processes because the guarantee under test
(an acknowledged request survives a SIGKILL; two writers lose nothing) is about processes
and the filesystem, not about objects in one interpreter.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_unlearn.platform.core import deletion_feed as feed
from ray_unlearn.platform.core.deletion_log import (
    DeletionLog,
    DeletionLogError,
    DeletionRequest,
    RequestRecord,
    RequestState,
)
from ray_unlearn.platform.core.storage import RunLayout, Storage

REPO = Path(__file__).resolve().parents[2]
LAYOUT = RunLayout("run-1")
S = RequestState

# One script for both process tests: submit <count> requests (forever if -1), printing an
# ACK line only after submit returned, and move some of them along, printing MOVED lines.
WRITER = r"""
import sys
from ray_unlearn.platform.core.deletion_log import DeletionLog
from ray_unlearn.platform.core.storage import RunLayout, Storage

root, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
dl = DeletionLog(Storage(root), RunLayout("run-1"))
i = 0
while count < 0 or i < count:
    rid = f"{tag}-{i}"
    dl.submit([i, i + 1, 10_000 + i], request_id=rid, owner_id=f"{tag}-owner-{i % 3}")
    print("ACK", rid, flush=True)
    if i % 2 == 0:
        dl.transition(rid, "executing", executed_by=tag)
        print("MOVED", rid, "executing", flush=True)
    if i % 4 == 0:
        dl.transition(rid, "done", versions_retired=[f"{tag}-v{i}"])
        print("MOVED", rid, "done", flush=True)
    i += 1
"""


def _writer(root: str, tag: str, count: int) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, root, tag, str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def _parse(lines: list[str]) -> tuple[list[str], dict[str, str]]:
    acked, moved = [], {}
    for line in lines:
        if not line.endswith("\n"):  # cut off by the kill: never a completed acknowledgement
            continue
        parts = line.split()
        if parts[0] == "ACK":
            acked.append(parts[1])
        elif parts[0] == "MOVED":
            moved[parts[1]] = parts[2]
    return acked, moved


@pytest.fixture(params=["path", "file-uri", "mock-fs"])
def storage(request, tmp_path) -> Storage:
    """The same log over a plain path, a file:// URI and a non-local pyarrow filesystem."""
    if request.param == "path":
        return Storage(tmp_path)
    if request.param == "file-uri":
        return Storage(f"file://{tmp_path}")
    return Storage("mock:///root")


@pytest.fixture
def dlog(tmp_path) -> DeletionLog:
    return DeletionLog(Storage(tmp_path), LAYOUT)


def _folder(tmp_path: Path, which: str) -> Path:
    return tmp_path / getattr(LAYOUT, which)


def _req_dir(tmp_path: Path, rid: str) -> Path:
    return tmp_path / LAYOUT.deletion_request_dir(rid)


def _drive(dlog: DeletionLog, rid: str, state: RequestState) -> None:
    path = {
        S.PENDING: [],
        S.EXECUTING: [S.EXECUTING],
        S.FAILED: [S.EXECUTING, S.FAILED],
        S.DONE: [S.EXECUTING, S.DONE],
    }[state]
    for st in path:
        dlog.transition(rid, st)


# -- round trip and state machine ------------------------------------------------------------


def test_submit_get_transition_round_trip(storage):
    dlog = DeletionLog(storage, LAYOUT)
    rec, created = dlog.submit(
        [5, 3, 5, 9], owner_id="alice", request_id="r1", deadline=2000.0, received_at=1000.0
    )
    assert created and isinstance(rec, RequestRecord)
    assert rec.request == DeletionRequest("r1", [3, 5, 9], "alice", 1000.0, 2000.0)
    assert rec.state is S.PENDING and rec.details == {} and rec.done_at is None
    assert dlog.get("r1") == rec
    assert DeletionRequest.from_json(json.loads(json.dumps(rec.request.to_json()))) == rec.request

    r = dlog.transition("r1", S.EXECUTING, executed_by="executor-0")
    assert r.state is S.EXECUTING and r.executed_by == "executor-0"
    r = dlog.transition("r1", "done", versions_retired=["s000-r01-g0001"], versions_created=["x"])
    assert r == dlog.get("r1")
    assert r.state is S.DONE
    assert r.versions_retired == ["s000-r01-g0001"] and r.versions_created == ["x"]
    assert r.executed_by == "executor-0"
    assert r.done_at == r.history[-1]["at"] and r.details["versions_created"] == ["x"]
    names = storage.listdir(LAYOUT.deletion_request_dir("r1"))
    assert names[-1] == "request.json" and len(names) == 3  # the request and its 2 events
    assert dlog.deleted_sample_ids() == {3, 5, 9}
    assert json.loads(json.dumps(r.to_json()))["state"] == "done"


def test_history_is_in_order_across_requeue_and_retry(dlog):
    dlog.submit([1], request_id="r", received_at=time.time() - 10)
    steps = [
        (S.EXECUTING, {"executed_by": "a"}),
        (S.PENDING, {"reason": "executor crashed"}),
        (S.EXECUTING, {"executed_by": "b"}),
        (S.FAILED, {"error": "boom"}),
        (S.EXECUTING, {"executed_by": "c"}),
        (S.DONE, {"versions_retired": ["v1", "v2"]}),
    ]
    for st, details in steps:
        dlog.transition("r", st, **details)
    rec = dlog.get("r")
    assert [h["state"] for h in rec.history] == ["pending"] + [st.value for st, _ in steps]
    assert [h["details"] for h in rec.history[1:]] == [d for _, d in steps]
    ats = [h["at"] for h in rec.history]
    assert ats == sorted(ats) and len(set(ats)) == len(ats)
    assert rec.executed_by == "c" and rec.versions_retired == ["v1", "v2"]


def test_history_order_survives_a_clock_going_backwards(dlog, monkeypatch):
    dlog.submit([1], request_id="r")
    dlog.transition("r", S.EXECUTING)
    # Another host's clock (or a stepped clock) far behind: names must still sort after.
    monkeypatch.setattr(time, "time_ns", lambda: 1_000)
    fresh = DeletionLog(dlog.storage, LAYOUT)  # no in-process memory of the last name
    fresh.transition("r", S.FAILED)
    fresh.transition("r", S.EXECUTING)
    assert [h["state"] for h in fresh.get("r").history] == [
        "pending",
        "executing",
        "failed",
        "executing",
    ]


ALLOWED = {
    (S.PENDING, S.EXECUTING),
    (S.EXECUTING, S.DONE),
    (S.EXECUTING, S.FAILED),
    (S.EXECUTING, S.PENDING),
    (S.FAILED, S.EXECUTING),
}


@pytest.mark.parametrize("src", list(S))
@pytest.mark.parametrize("dst", list(S))
def test_transition_matrix(dlog, tmp_path, src, dst):
    dlog.submit([1], request_id="r")
    _drive(dlog, "r", src)
    events = _req_dir(tmp_path, "r")
    before = sorted(os.listdir(events)) if events.exists() else []
    if (src, dst) in ALLOWED:
        assert dlog.transition("r", dst).state is dst
        assert dlog.get("r").state is dst
        return
    with pytest.raises(DeletionLogError) as e:
        dlog.transition("r", dst)
    msg = str(e.value)
    assert f"{src.value} -> {dst.value}" in msg and "not allowed" in msg
    allowed = sorted(d.value for s, d in ALLOWED if s == src)
    assert all(a in msg for a in allowed) if allowed else "final" in msg
    assert dlog.get("r").state is src
    assert (sorted(os.listdir(events)) if events.exists() else []) == before


def test_pending_to_done_is_refused(dlog):
    dlog.submit([1], request_id="r")
    with pytest.raises(DeletionLogError, match=r"pending -> done is not allowed.*executing"):
        dlog.transition("r", S.DONE)


def test_unknown_request_and_unknown_state(dlog):
    with pytest.raises(DeletionLogError, match="unknown deletion request 'nope'"):
        dlog.get("nope")
    with pytest.raises(DeletionLogError, match="unknown deletion request"):
        dlog.transition("nope", S.EXECUTING)
    dlog.submit([1], request_id="r")
    with pytest.raises(DeletionLogError, match="unknown state 'finished'"):
        dlog.transition("r", "finished")
    with pytest.raises(DeletionLogError, match="JSON-serialisable"):
        dlog.transition("r", S.EXECUTING, executor=object())
    assert dlog.get("r").state is S.PENDING and dlog.get("r").history[1:] == []


# -- idempotency and validation ------------------------------------------------------------


def test_resubmitting_the_same_request_is_a_no_op(dlog, tmp_path):
    first, created = dlog.submit([3, 1, 2], owner_id="bob", request_id="r", received_at=100.0)
    assert created
    dlog.transition("r", S.EXECUTING)
    again, created = dlog.submit([2, 3, 1, 1], owner_id="bob", request_id="r", deadline=1e12)
    assert not created
    assert again.request == first.request  # the stored request, not the retry's times
    assert again.state is S.EXECUTING
    assert os.listdir(tmp_path / "runs/run-1/deletions/r") == ["r"]


@pytest.mark.parametrize(
    "kwargs", [{"sample_ids": [1, 2, 4]}, {"owner_id": "mallory"}, {"owner_id": None}]
)
def test_resubmitting_an_id_with_other_content_is_refused(dlog, tmp_path, kwargs):
    dlog.submit([1, 2, 3], owner_id="bob", request_id="r")
    path = _req_dir(tmp_path, "r") / "request.json"
    stored = path.read_bytes()
    feed_before = sorted((tmp_path / LAYOUT.deletion_feed).rglob("*"))
    args = {"sample_ids": [1, 2, 3], "owner_id": "bob", "request_id": "r", **kwargs}
    with pytest.raises(DeletionLogError, match="'r' already exists with different content"):
        dlog.submit(args.pop("sample_ids"), **args)
    assert path.read_bytes() == stored
    assert os.listdir(path.parent) == ["request.json"]
    assert sorted((tmp_path / LAYOUT.deletion_feed).rglob("*")) == feed_before


def test_generated_ids_are_unique_and_valid(dlog):
    ids = {dlog.submit([i])[0].request_id for i in range(20)}
    assert len(ids) == 20
    assert all(i.startswith("req-") and len(i) == 16 for i in ids)
    assert {r.request_id for r in dlog.records()} == ids


@pytest.mark.parametrize(
    ("sample_ids", "kwargs", "match"),
    [
        ([], {}, "at least one sample id"),
        ([1, "2"], {}, "is not an int"),
        ([1, True], {}, "bool"),
        ([1.0], {}, "is not an int"),
        ("123", {}, "collection of ints"),
        (5, {}, "collection of ints"),
        ([2**63], {}, "int64"),
        ([1], {"request_id": "a/b"}, "bad request id"),
        ([1], {"request_id": "../escape"}, "bad request id"),
        ([1], {"request_id": ""}, "bad request id"),
        ([1], {"request_id": "-leading-dash"}, "bad request id"),
        ([1], {"request_id": "has space"}, "bad request id"),
        ([1], {"request_id": "x" * 129}, "bad request id"),
        ([1], {"request_id": 7}, "bad request id"),
        ([1], {"received_at": 100.0, "deadline": 50.0}, "not after received_at"),
        ([1], {"received_at": 100.0, "deadline": 100.0}, "not after received_at"),
        ([1], {"deadline": time.time() - 3600}, "not after received_at"),
        ([1], {"received_at": float("nan")}, "finite unix time"),
        ([1], {"deadline": "tomorrow"}, "finite unix time"),
        ([1], {"owner_id": 42}, "owner_id"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(dlog, tmp_path, sample_ids, kwargs, match):
    with pytest.raises(DeletionLogError, match=match):
        dlog.submit(sample_ids, **kwargs)
    assert not (tmp_path / LAYOUT.root).exists()
    assert dlog.records() == []


def test_numpy_ids_are_accepted_as_plain_ints(dlog):
    np = pytest.importorskip("numpy")
    rec, _ = dlog.submit(np.array([7, 3, 7], dtype=np.int64), request_id="r")
    assert rec.request.sample_ids == [3, 7] and all(type(s) is int for s in rec.request.sample_ids)


# -- queries ---------------------------------------------------------------------------------


def test_queries_for_execution_and_audit(dlog):
    dlog.submit([1, 2], owner_id="ann", request_id="b", received_at=300.0)
    dlog.submit([2, 3], owner_id="ann", request_id="a", received_at=300.0)
    dlog.submit([4], owner_id="bo", request_id="c", received_at=100.0)
    dlog.submit([5], request_id="d", received_at=200.0)
    _drive(dlog, "a", S.DONE)
    _drive(dlog, "c", S.FAILED)
    _drive(dlog, "d", S.EXECUTING)
    assert [r.request_id for r in dlog.records()] == ["c", "d", "a", "b"]
    assert [(r.request_id, r.state) for r in dlog.unfinished()] == [
        ("c", S.FAILED),
        ("d", S.EXECUTING),
        ("b", S.PENDING),
    ]
    assert dlog.deleted_sample_ids() == {2, 3}
    assert [r.request_id for r in dlog.requests_for_sample(2)] == ["a", "b"]
    assert dlog.requests_for_sample(99) == []
    assert [r.request_id for r in dlog.requests_for_owner("ann")] == ["a", "b"]
    assert [r.request_id for r in dlog.requests_for_owner("bo")] == ["c"]


def test_an_empty_log_reads_empty(dlog):
    assert dlog.records() == [] and dlog.unfinished() == [] and dlog.deleted_sample_ids() == set()


# -- tolerance and durability ------------------------------------------------------------------


def _mark(tmp_path: Path, rid: str, record: str, ns: int | None = None) -> None:
    """A feed marker for ``record`` of ``rid``, as a writer would leave it."""
    ns = time.time_ns() if ns is None else ns
    folder = tmp_path / LAYOUT.deletion_feed / f"{ns // feed.BUCKET_NS:012d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / feed.marker_name(ns, rid, record)).write_bytes(b"")


def _plant_debris(tmp_path: Path, rid: str) -> None:
    req_dir = _req_dir(tmp_path, rid)
    ns = time.time_ns()
    torn = {
        f"{ns:020d}-deadbeef.json": b'{"request_id": "' + rid.encode(),
        f"{ns + 1:020d}-0badf00d.json": b"\x00\xff garbage",
        f"{ns + 2:020d}-00c0ffee.json": json.dumps(
            {"request_id": "someone-else", "state": "done", "at": 1.0, "details": {}}
        ).encode(),
    }
    for name, data in torn.items():
        (req_dir / name).write_bytes(data)
        _mark(tmp_path, rid, name)
    ghost = _req_dir(tmp_path, "ghost")
    ghost.mkdir(parents=True)
    name = f"{ns + 3:020d}-12345678.json"
    (ghost / name).write_text(
        json.dumps({"request_id": "ghost", "state": "executing", "at": 1.0, "details": {}})
    )
    _mark(tmp_path, "ghost", name)
    (req_dir / ".tmp-abcdef.part").write_bytes(b'{"half')
    (req_dir / "README").write_text("not an event")
    torn_req = _req_dir(tmp_path, "torn")
    torn_req.mkdir(parents=True)
    (torn_req / "request.json").write_bytes(b'{"request_id": "torn", "sample_')
    _mark(tmp_path, "torn", "request.json")
    feed_dir = tmp_path / LAYOUT.deletion_feed / f"{ns // feed.BUCKET_NS:012d}"
    (feed_dir / ".tmp-123456.part").write_bytes(b"")
    (feed_dir / "README").write_text("not a marker")
    # a marker whose record never came (its writer died between the two writes): silent
    _mark(tmp_path, rid, f"{ns + 5:020d}-facefeed.json")


def test_reading_skips_debris_with_warnings(dlog, tmp_path, caplog):
    dlog.submit([1, 2], request_id="r")
    dlog.transition("r", S.EXECUTING, executed_by="x")
    dlog.submit([3], request_id="s")
    expected = {r.request_id: r for r in dlog.records()}
    _plant_debris(tmp_path, "r")
    # A transition that is invalid from the folded state (two writers racing) is skipped.
    late = _req_dir(tmp_path, "s") / f"{time.time_ns() + 10:020d}-feedface.json"
    late.write_text(json.dumps({"request_id": "s", "state": "done", "at": 2.0, "details": {}}))
    _mark(tmp_path, "s", late.name)

    with caplog.at_level(logging.WARNING, logger="ray_unlearn.platform.core.deletion_log"):
        recs = dlog.records()
        assert {r.request_id: r for r in recs} == expected
        assert dlog.get("r") == expected["r"] and dlog.get("s") == expected["s"]
        assert dlog.unfinished() == list(expected.values())
    text = caplog.text
    for needle in (
        "unreadable event file",
        "unknown request 'ghost'",
        "unreadable request file of 'torn'",
        "unexpected file 'README' in runs/run-1/deletions/r/r",
        "unexpected file 'README' in the feed",
        "not a valid transition",
    ):
        assert needle in text
    assert ".tmp-" not in text  # in-flight writes are normal, not worth a warning
    # Debris does not block progress either.
    assert dlog.transition("r", S.DONE).state is S.DONE
    assert dlog.transition("s", S.EXECUTING).state is S.EXECUTING
    with pytest.raises(DeletionLogError, match="stored but unreadable"):
        dlog.get("torn")


def test_acknowledged_requests_survive_sigkill(tmp_path, caplog):
    rng = random.Random(20240601)
    root = str(tmp_path)
    all_acked: list[str] = []
    for rnd in range(3):
        proc = _writer(root, f"crash{rnd}", -1)
        assert proc.stdout is not None and proc.stderr is not None
        lines = [proc.stdout.readline()]
        assert lines[0], f"writer died before its first ack: {proc.stderr.read()}"
        time.sleep(rng.uniform(0.01, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        lines += proc.stdout.readlines()  # what was flushed before the kill is in the pipe
        proc.stdout.close()
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        acked, moved = _parse(lines)
        assert acked, "no request was acknowledged before the kill"
        all_acked += acked

        dlog = DeletionLog(Storage(root), LAYOUT)
        with caplog.at_level(logging.WARNING, logger="ray_unlearn.platform.core.deletion_log"):
            by_id = {r.request_id: r for r in dlog.records()}
        # Atomic local writes leave at most temp files behind, never a torn record.
        assert [r for r in caplog.records if r.name.endswith("deletion_log")] == []
        missing = [rid for rid in all_acked if rid not in by_id]
        assert missing == []
        for rid, st in moved.items():
            ok = (S.DONE,) if st == "done" else (S.EXECUTING, S.DONE)
            assert by_id[rid].state in ok
            assert dlog.get(rid) == by_id[rid]
        i = int(acked[-1].rsplit("-", 1)[1])
        assert by_id[acked[-1]].request.sample_ids == [i, i + 1, 10_000 + i]

    _plant_debris(tmp_path, all_acked[0])
    dlog = DeletionLog(Storage(root), LAYOUT)
    assert {rid for rid in all_acked} <= {r.request_id for r in dlog.records()}
    # The log keeps working after crashes: finish everything that was left unfinished.
    for r in dlog.unfinished():
        if r.state is S.PENDING:
            dlog.transition(r.request_id, S.EXECUTING)
        dlog.transition(r.request_id, S.DONE)
    assert dlog.unfinished() == []


def test_two_writer_processes_lose_nothing(tmp_path):
    n = 40
    procs = {tag: _writer(str(tmp_path), tag, n) for tag in ("left", "right")}
    outs = {}
    for tag, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outs[tag] = _parse(out.splitlines(keepends=True))
    dlog = DeletionLog(Storage(tmp_path), LAYOUT)
    by_id = {r.request_id: r for r in dlog.records()}
    for tag, (acked, _moved) in outs.items():
        assert acked == [f"{tag}-{i}" for i in range(n)]
        for i in range(n):
            rec = by_id[f"{tag}-{i}"]
            want = S.DONE if i % 4 == 0 else S.EXECUTING if i % 2 == 0 else S.PENDING
            assert rec.state is want
            assert rec.request.owner_id == f"{tag}-owner-{i % 3}"
            if want is S.DONE:
                assert rec.versions_retired == [f"{tag}-v{i}"] and rec.executed_by == tag
    assert len(by_id) == 2 * n
    assert len(dlog.requests_for_owner("left-owner-0")) == len(range(0, n, 3))


def test_file_uri_root_is_the_same_log_as_the_path(tmp_path):
    via_uri = DeletionLog(Storage(f"file://{tmp_path}"), LAYOUT)
    rec, created = via_uri.submit([4, 2], owner_id="o", request_id="r")
    assert created
    via_uri.transition("r", S.EXECUTING)
    assert (_req_dir(tmp_path, "r") / "request.json").is_file()
    via_path = DeletionLog(Storage(tmp_path), LAYOUT)
    assert via_path.get("r") == via_uri.get("r")
    assert via_path.submit([2, 4], owner_id="o", request_id="r")[1] is False
    via_path.transition("r", S.DONE)
    assert via_uri.deleted_sample_ids() == {2, 4}


def test_reading_the_log_again_reads_only_new_files(storage):
    """Files of the log are created whole and never changed: a reader parses each once."""
    dlog = DeletionLog(storage, LAYOUT)
    for i in range(3):
        dlog.submit([i], request_id=f"r{i}")
        dlog.transition(f"r{i}", RequestState.EXECUTING)
    reads: list[str] = []
    real = storage.read_bytes

    def counting(rel: str) -> bytes:
        reads.append(rel)
        return real(rel)

    storage.read_bytes = counting  # type: ignore[method-assign]
    dlog = DeletionLog(storage, LAYOUT)  # a new reader: it has read nothing yet
    first = dlog.records()
    assert len(reads) == 6 and [r.state for r in first] == [RequestState.EXECUTING] * 3
    reads.clear()
    assert [r.state for r in dlog.records()] == [RequestState.EXECUTING] * 3
    assert reads == []  # nothing new: no file read again
    dlog.transition("r1", RequestState.DONE)  # one new event (its write reads r1's files)
    other = DeletionLog(storage, LAYOUT)  # another process appends a request
    other.submit([9], request_id="r9")
    reads.clear()
    states = {r.request_id: r.state for r in dlog.records()}
    assert states == {
        "r0": RequestState.EXECUTING,
        "r1": RequestState.DONE,
        "r2": RequestState.EXECUTING,
        "r9": RequestState.PENDING,
    }
    assert len(reads) == 2  # the new event and the new request


def test_records_are_copies_a_caller_cannot_change_for_the_next(dlog):
    dlog.submit([1, 2], request_id="r")
    dlog.transition("r", RequestState.EXECUTING, details={"executed_by": "x"})
    first = dlog.records()[0]
    want = json.loads(json.dumps(first.history[-1]["details"]))
    assert "x" in json.dumps(want)
    first.request.sample_ids.append(99)
    first.history[-1]["details"].clear()
    again = dlog.records()[0]
    assert again.request.sample_ids == [1, 2]
    assert again.history[-1]["details"] == want
