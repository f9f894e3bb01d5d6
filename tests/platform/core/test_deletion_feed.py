"""The deletion log at scale: per-request prefixes, cursor reads, snapshots plus tail against a
full fold, snapshot crash safety, the sample/owner indexes, and the first layout's migration."""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from pathlib import Path

import pytest

from ray_unlearn.platform.core import deletion_feed as feed
from ray_unlearn.platform.core.deletion_log import (
    ALLOWED_TRANSITIONS,
    DeletionLog,
    DeletionLogError,
    RequestState,
)
from ray_unlearn.platform.core.storage import RunLayout, Storage

LAYOUT = RunLayout("run-1")
S = RequestState


class Counting(Storage):
    """A storage that counts listings and reads (what a reader costs)."""

    def __init__(self, root):
        super().__init__(root)
        self.lists: list[str] = []
        self.reads: list[str] = []

    def listdir(self, rel):
        self.lists.append(rel)
        return super().listdir(rel)

    def read_bytes(self, rel):
        self.reads.append(rel)
        return super().read_bytes(rel)

    def clear(self):
        self.lists.clear()
        self.reads.clear()


@pytest.fixture(params=["path", "mock-fs"])
def root(request, tmp_path) -> str:
    return str(tmp_path) if request.param == "path" else f"mock:///{uuid.uuid4().hex}"


def _fill(dlog: DeletionLog, n: int) -> None:
    for i in range(n):
        dlog.submit([i, 1000 + i], owner_id=f"o{i % 7}", request_id=f"r{i}")
        if i % 2 == 0:
            dlog.transition(f"r{i}", S.EXECUTING)
        if i % 4 == 0:
            dlog.transition(f"r{i}", S.DONE)


def test_one_request_is_read_from_its_own_prefix(root):
    storage = Counting(root)
    dlog = DeletionLog(storage, LAYOUT)
    _fill(dlog, 30)
    storage.clear()
    assert DeletionLog(storage, LAYOUT).get("r8").state is S.DONE
    # plus, once per instance, the check for a log of the first layout to migrate
    prefixes = {LAYOUT.deletion_request_dir("r8"), LAYOUT.deletion_requests, LAYOUT.deletion_events}
    assert set(storage.lists) == prefixes
    assert all(r.startswith(LAYOUT.deletion_request_dir("r8") + "/") for r in storage.reads)
    storage.clear()
    dlog.transition("r3", S.EXECUTING)
    assert set(storage.lists) <= {LAYOUT.deletion_request_dir("r3")} | _feed_folders(storage)


def _feed_folders(storage: Counting) -> set[str]:
    return {p for p in storage.lists if p.startswith(LAYOUT.deletion_feed)}


def test_a_poll_reads_only_what_changed(root):
    storage = Counting(root)
    writer = DeletionLog(storage, LAYOUT, snapshot_every=None)
    _fill(writer, 40)
    reader = DeletionLog(storage, LAYOUT, snapshot_every=None)
    assert len(reader.records()) == 40
    storage.clear()
    assert len(reader.unfinished()) == 30 and reader.poll() == 0
    assert storage.reads == []  # nothing new: nothing read
    assert len(storage.lists) <= 2 * 4  # a few feed buckets per poll, never the prefixes
    assert set(storage.lists) == _feed_folders(storage)
    writer.submit([5000], request_id="new")
    writer.transition("r1", S.EXECUTING)
    storage.clear()
    assert reader.poll() == 2
    assert (
        sorted(storage.reads)
        == sorted(
            [
                f"{LAYOUT.deletion_request_dir('new')}/request.json",
                *[
                    r
                    for r in storage.reads
                    if r.startswith(LAYOUT.deletion_request_dir("r1") + "/") and r.endswith(".json")
                ],
            ]
        )
        and len(storage.reads) == 2
    )
    assert reader.get("r1").state is S.EXECUTING
    assert {r.request_id for r in reader.unfinished()} >= {"new", "r1"}


def test_a_marker_whose_record_comes_late_is_picked_up(tmp_path):
    storage = Storage(tmp_path)
    dlog = DeletionLog(storage, LAYOUT)
    dlog.submit([1], request_id="a")
    reader = DeletionLog(storage, LAYOUT)
    reader.poll()
    # A writer between its two writes: the marker is there, the record not yet.
    feed.write_marker(storage, LAYOUT, "b", feed.REQUEST_FILE)
    assert reader.poll() == 0 and [r.request_id for r in reader.records()] == ["a"]
    data = json.dumps(
        {
            "request_id": "b",
            "sample_ids": [2],
            "owner_id": None,
            "received_at": 5.0,
            "deadline": None,
        }
    ).encode()
    storage.write_bytes(f"{LAYOUT.deletion_request_dir('b')}/request.json", data)
    assert reader.poll() == 1
    assert [r.request_id for r in reader.records()] == ["b", "a"]


def _random_history(dlog: DeletionLog, rng: random.Random, n_ops: int, snap_at: set[int]):
    """Random submits and transitions (valid ones, invalid ones refused), with snapshots
    taken at the given steps by a reader (as a gateway or the executor would)."""
    snapper = DeletionLog(dlog.storage, LAYOUT, snapshot_every=None)
    ids: list[str] = []
    for step in range(n_ops):
        if not ids or rng.random() < 0.35:
            rid = f"q{len(ids)}"
            samples = rng.sample(range(200), rng.randint(1, 4))
            owner = rng.choice([None, "ann", "bo", "cy"])
            dlog.submit(samples, owner_id=owner, request_id=rid, received_at=1000.0 + step)
            ids.append(rid)
        else:
            rid = rng.choice(ids)
            new = rng.choice(list(S))
            cur = dlog.get(rid).state
            if new in ALLOWED_TRANSITIONS[cur]:
                dlog.transition(rid, new, step=step)
            else:
                with pytest.raises(DeletionLogError):
                    dlog.transition(rid, new)
        if step in snap_at:
            snapper.snapshot()
    return ids


def _state(dlog: DeletionLog):
    recs = dlog.records()
    return (
        [r.to_json() for r in recs],
        dlog.deleted_sample_ids(),
        dlog.requested_sample_ids(),
        {o: [r.request_id for r in dlog.requests_for_owner(o)] for o in ("ann", "bo", "cy")},
        {s: [r.request_id for r in dlog.requests_for_sample(s)] for s in range(200)},
    )


@pytest.mark.parametrize("seed", range(12))
def test_snapshot_plus_tail_equals_a_full_fold(tmp_path, seed):
    rng = random.Random(seed)
    storage = Storage(tmp_path)
    dlog = DeletionLog(storage, LAYOUT, snapshot_every=None)
    n = rng.randint(5, 60)
    ids = _random_history(dlog, rng, n, {rng.randrange(n) for _ in range(rng.randint(1, 3))})
    assert storage.listdir(LAYOUT.deletion_snapshots)
    cold = DeletionLog(storage, LAYOUT, snapshot_every=None)  # starts from the newest snapshot
    got = _state(cold)
    # The reference: each request folded from its own prefix, no snapshot, no feed.
    by_get = [dlog.get(rid).to_json() for rid in ids]
    assert sorted(got[0], key=lambda r: r["request_id"]) == sorted(
        by_get, key=lambda r: r["request_id"]
    )
    done = {s for r in by_get if r["state"] == "done" for s in r["sample_ids"]}
    assert got[1] == done
    assert got[2] == {s for r in by_get for s in r["sample_ids"]}
    # and a reader that ignores snapshots (follows the whole feed) agrees
    for name in storage.listdir(LAYOUT.deletion_snapshots):
        storage.delete(f"{LAYOUT.deletion_snapshots}/{name}")
    assert _state(DeletionLog(storage, LAYOUT, snapshot_every=None)) == got
    # a warm reader that followed everything agrees too
    assert _state(dlog) == got


def test_a_snapshot_holds_what_the_issue_asks_and_cold_reads_one_plus_tail(tmp_path):
    storage = Counting(tmp_path)
    dlog = DeletionLog(storage, LAYOUT, snapshot_every=None)
    _fill(dlog, 50)
    dlog.snapshot()
    dlog.submit([9999], owner_id="late", request_id="tail-1")
    (name,) = storage.listdir(LAYOUT.deletion_snapshots)
    doc = json.loads((tmp_path / LAYOUT.deletion_snapshots / name).read_bytes())
    assert len(doc["requests"]) == 50 and doc["owners"]["o0"]
    assert set(doc["deleted"]) == {s for i in range(0, 50, 4) for s in (i, 1000 + i)}
    storage.clear()
    cold = DeletionLog(storage, LAYOUT, snapshot_every=None)
    assert cold.is_requested(9999) and not cold.is_deleted(9999)
    assert cold.is_deleted(4) and not cold.is_deleted(2) and cold.is_requested(2)
    assert [r.request_id for r in cold.requests_for_owner("late")] == ["tail-1"]
    # one snapshot read, the tail's one request: no per-request file of the 50 read
    assert storage.reads == [
        f"{LAYOUT.deletion_snapshots}/{name}",
        f"{LAYOUT.deletion_request_dir('tail-1')}/request.json",
    ]


def test_a_crash_while_snapshotting_loses_nothing(tmp_path, caplog):
    storage = Storage(tmp_path)
    dlog = DeletionLog(storage, LAYOUT, snapshot_every=None)
    _fill(dlog, 20)
    dlog.snapshot()
    _fill_more = [dlog.submit([500 + i], request_id=f"x{i}") for i in range(5)]
    assert _fill_more
    real = storage.write_bytes

    def dying(rel, data, **kw):
        if rel.startswith(LAYOUT.deletion_snapshots):
            raise OSError("killed mid-write")
        return real(rel, data, **kw)

    storage.write_bytes = dying  # type: ignore[method-assign]
    with pytest.raises(OSError):
        dlog.snapshot()
    storage.write_bytes = real  # type: ignore[method-assign]
    # a torn snapshot (a filesystem without atomic rename) is skipped for the older one
    torn = f"{time.time_ns():020d}-deadbeef.json"
    (tmp_path / LAYOUT.deletion_snapshots / torn).write_bytes(b'{"format": 1, "requ')
    with caplog.at_level(logging.WARNING, logger="ray_unlearn.platform.core.deletion_log"):
        cold = DeletionLog(storage, LAYOUT)
        got = {r.request_id: r.state for r in cold.records()}
    assert "unreadable, an older one is used" in caplog.text
    assert got == {r.request_id: r.state for r in dlog.records()} and len(got) == 25
    # every request's own files are still there: a snapshot never deletes a record
    assert len(storage.listdir(f"{LAYOUT.root}/deletions/r")) == 25


def test_polls_write_snapshots_by_themselves(tmp_path, monkeypatch):
    monkeypatch.setattr("ray_unlearn.platform.core.deletion_reader.SNAPSHOT_MIN_TAIL", 10)
    storage = Storage(tmp_path)
    dlog = DeletionLog(storage, LAYOUT, snapshot_every=10)
    for i in range(12):
        dlog.submit([i], request_id=f"r{i}")
    assert dlog.count() == 12
    assert storage.listdir(LAYOUT.deletion_snapshots) == []  # a gateway: it only submits
    dlog.transition("r0", S.EXECUTING)  # now it executes: its polls snapshot
    assert dlog.count() == 12
    assert len(storage.listdir(LAYOUT.deletion_snapshots)) == 1
    for i in range(40):
        dlog.submit([100 + i], request_id=f"s{i}")
        dlog.poll()
    assert len(storage.listdir(LAYOUT.deletion_snapshots)) == feed.KEEP_SNAPSHOTS


def test_a_log_of_the_first_layout_is_migrated_once(tmp_path, caplog):
    old_req = tmp_path / LAYOUT.deletion_requests
    old_ev = tmp_path / LAYOUT.deletion_events
    old_req.mkdir(parents=True)
    old_ev.mkdir(parents=True)
    for rid, ids in (("a", [1, 2]), ("b-x", [3])):
        (old_req / f"{rid}.json").write_text(
            json.dumps(
                {
                    "request_id": rid,
                    "sample_ids": ids,
                    "owner_id": "o",
                    "received_at": 1.0,
                    "deadline": None,
                }
            )
        )
    for k, (rid, st) in enumerate((("a", "executing"), ("a", "done"), ("b-x", "executing"))):
        (old_ev / f"{10**18 + k:020d}-{rid}-0000000{k}.json").write_text(
            json.dumps({"request_id": rid, "state": st, "at": 2.0 + k, "details": {"k": k}})
        )
    (old_req / "torn.json").write_bytes(b'{"requ')
    with caplog.at_level(logging.WARNING, logger="ray_unlearn.platform.core.deletion_log"):
        dlog = DeletionLog(Storage(tmp_path), LAYOUT)
        states = {r.request_id: r.state for r in dlog.records()}
    assert states == {"a": S.DONE, "b-x": S.EXECUTING}
    assert "migrating 3 request(s) and 3 event(s) from the first layout" in caplog.text
    assert dlog.get("a").history[-1]["details"] == {"k": 1}
    assert dlog.deleted_sample_ids() == {1, 2}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ray_unlearn.platform.core.deletion_log"):
        again = DeletionLog(Storage(tmp_path), LAYOUT)
        assert {r.request_id: r.state for r in again.records()} == states
    assert "migrating" not in caplog.text
    again.transition("b-x", S.DONE)
    assert DeletionLog(Storage(tmp_path), LAYOUT).deleted_sample_ids() == {1, 2, 3}
    assert (old_req / "a.json").exists()  # the old files are kept, never deleted


def test_index_queries_do_not_fold_the_log(tmp_path, monkeypatch):
    dlog = DeletionLog(Storage(tmp_path), LAYOUT, snapshot_every=None)
    _fill(dlog, 30)
    dlog.poll()
    calls = []
    import ray_unlearn.platform.core.deletion_reader as mod

    real = mod.fold
    monkeypatch.setattr(mod, "fold", lambda *a: calls.append(1) or real(*a))
    assert dlog.is_deleted(8) and dlog.is_deleted(1008) and not dlog.is_deleted(9)
    assert dlog.is_requested(9) and not dlog.is_requested(5000)
    assert len(dlog.requests_for_owner("o1")) == len(range(1, 30, 7))
    assert calls == []


def test_samples_in_a_path_are_ints_not_strings(tmp_path: Path):
    dlog = DeletionLog(Storage(tmp_path), LAYOUT)
    dlog.submit([2**40], request_id="big")
    cold = DeletionLog(Storage(tmp_path), LAYOUT)
    cold.snapshot()
    assert DeletionLog(Storage(tmp_path), LAYOUT).requested_sample_ids() == {2**40}
