"""Fencing gateways by lease through the storage root (no Ray): the acknowledging side's
wait, the replica's view, and submit_request's acknowledgement."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from ray_unlearn.platform.core.deletion_log import DeletionRequest, RequestRecord, RequestState
from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine, submit_request
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.storage import RunLayout, Storage
from ray_unlearn.platform.serving import fence
from ray_unlearn.platform.serving.view import DeletionTracker, ServingView, read_view


@pytest.fixture
def root(tmp_path):
    return Storage(tmp_path / "store"), RunLayout("r1")


class _Clock:
    """A fake wall clock that advances only when the waiter sleeps."""

    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def _register(storage, layout, name, view_at, lease=2.0):
    reg = fence.Registration(name, lease, 0.05, view_at=view_at)
    fence.write_registration(storage, layout, reg)
    return reg


def test_no_gateway_means_no_wait(root):
    storage, layout = root
    clock = _Clock(1000.0)
    out = fence.await_fence(storage, layout, 1000.0, clock=clock, sleep=clock.sleep)
    assert out == {"confirmed": [], "expired": [], "deregistered": [], "dead": []}
    assert clock.t == 1000.0


def test_a_view_that_started_after_the_write_confirms(root):
    storage, layout = root
    _register(storage, layout, "g1", view_at=1000.2)
    clock = _Clock(1000.3)
    out = fence.await_fence(storage, layout, 1000.0, clock=clock, sleep=clock.sleep)
    assert out["confirmed"] == ["g1"] and clock.t == 1000.3


@pytest.mark.parametrize("view_at", [None, 999.0, 1000.04])  # never read / before / within skew
def test_a_silent_gateway_is_fenced_only_by_its_lease(root, view_at):
    storage, layout = root
    _register(storage, layout, "g1", view_at=view_at, lease=2.0)
    clock = _Clock(1000.0)
    out = fence.await_fence(storage, layout, 1000.0, poll_s=0.1, clock=clock, sleep=clock.sleep)
    assert out["expired"] == ["g1"]
    assert clock.t > 1000.0 + 2.0 + 0.05  # waited the whole lease + skew, never less
    assert clock.t < 1000.0 + 2.0 + 0.05 + 0.2


def test_a_gateway_that_deregisters_counts_as_fenced(root):
    storage, layout = root
    _register(storage, layout, "g1", view_at=999.0)
    clock = _Clock(1000.0)

    def sleep(s):
        clock.sleep(s)
        if clock.t > 1000.5:
            fence.remove_registration(storage, layout, "g1")

    out = fence.await_fence(storage, layout, 1000.0, poll_s=0.1, clock=clock, sleep=sleep)
    assert out["deregistered"] == ["g1"] and clock.t < 1001.0


def test_an_unreadable_registration_waits_the_default_lease(root):
    storage, layout = root
    storage.write_bytes(fence.registration_path(layout, "g1"), b"{torn")
    clock = _Clock(1000.0)
    out = fence.await_fence(storage, layout, 1000.0, poll_s=0.1, clock=clock, sleep=clock.sleep)
    assert out["expired"] == ["g1"] and clock.t > 1000.0 + fence.DEFAULT_LEASE_S


def test_fence_settings_are_validated():
    with pytest.raises(fence.FenceError, match="lease_s must be a finite number > 0"):
        fence.FenceSettings(lease_s=float("nan"))
    with pytest.raises(fence.FenceError, match="must be below lease_s"):
        fence.FenceSettings(lease_s=0.1, interval_s=0.5)
    with pytest.raises(fence.FenceError, match="clock_skew_s"):
        fence.FenceSettings(clock_skew_s=-1)


def _record(rid, ids, t=100.0):
    return RequestRecord(DeletionRequest(rid, list(ids), None, t, None), RequestState.PENDING, [])


def test_serving_view_swaps_requests_and_versions_together(tiny_run):
    ctx = tiny_run
    view = ServingView(DeletionTracker(ctx.plan))
    t0, unfinished, versions = read_view(ctx)
    assert view.adopt(t0, unfinished, versions) and view.generation == 1
    assert not view.adopt(t0 + 1, unfinished, versions) and view.generation == 1  # same view
    assert view.view_at == t0 + 1
    assert not view.adopt(t0, [], {})  # an older read that finished late is ignored
    assert view.versions == versions
    assert view.valid(t0 + 2.9, 2.0) and not view.valid(t0 + 3.0, 2.0)
    sid = int(ctx.plan.sample_ids[ctx.plan.shards != TEST][0])
    view.add(_record("r", [sid]))
    assert view.generation == 2 and view.tracker.affected()


def test_a_done_request_leaves_the_view_only_with_its_new_versions(tiny_run):
    ctx = tiny_run
    sid = int(ctx.plan.sample_ids[ctx.plan.shards != TEST][0])
    shard = int(ctx.plan.locate([sid])[0][0])
    submit_request(ctx, sample_ids=[sid], request_id="a")
    view = ServingView(DeletionTracker(ctx.plan))
    view.adopt(*read_view(ctx))
    old = view.versions[shard]
    assert view.tracker.affected() == {shard}
    UnlearningEngine(ctx, LocalShards(ctx)).execute_pending()
    assert view.adopt(*read_view(ctx))
    assert view.tracker.affected() == set() and view.versions[shard] != old
    assert sid not in ctx.model_store.sample_ids(view.versions[shard])


def test_submit_request_waits_for_a_live_gateway_and_records_the_ack(tiny_run):
    """A gateway replica simulated by a thread that reads the log and publishes, as the
    Serve gateway does: the acknowledgement comes after its view holds the request."""
    ctx = tiny_run
    storage, layout = ctx.storage, ctx.layout
    # a long lease: on a loaded machine the thread may take seconds to publish, and the ack
    # must then still come from its confirmation, never from the lease running out
    lease_s = 60.0
    reg = fence.Registration.new("sim", fence.FenceSettings(lease_s=lease_s))
    fence.write_registration(storage, layout, reg)
    view = ServingView(DeletionTracker(ctx.plan))
    stop = threading.Event()

    def gateway():
        while not stop.is_set():
            started, unfinished, versions = read_view(ctx)
            view.adopt(started, unfinished, versions)
            reg.view_at = started
            fence.write_registration(storage, layout, reg)
            time.sleep(0.05)

    t = threading.Thread(target=gateway, daemon=True)
    t.start()
    try:
        owner = str(ctx.plan.owner_ids[ctx.plan.shards != TEST][0])
        t0 = time.time()
        record, created = submit_request(ctx, owner_id=owner, request_id="fenced")
        waited = time.time() - t0
        # the moment submit_request returns, the simulated replica's view gates the request
        assert "fenced" in view.tracker.items
    finally:
        stop.set()
        t.join()
    ack = fence.read_ack(storage, layout, "fenced")
    assert created and ack["confirmed"] == ["sim"] and ack["expired"] == []
    assert ack["acknowledged_at"] >= ack["written_at"] and waited < lease_s
    # a resubmission keeps the first acknowledgement: the promise started then
    submit_request(ctx, owner_id=owner, request_id="fenced")
    assert fence.read_ack(storage, layout, "fenced") == ack
    assert fence.read_acks(storage, layout) == {"fenced": ack["acknowledged_at"]}


def test_submit_request_waits_out_a_dead_gateway(tiny_run):
    ctx = tiny_run
    dead = fence.Registration("dead", 0.3, 0.05, view_at=time.time() - 10)
    fence.write_registration(ctx.storage, ctx.layout, dead)
    sid = int(ctx.plan.sample_ids[ctx.plan.shards != TEST][0])
    t0 = time.time()
    submit_request(ctx, sample_ids=np.array([sid]), request_id="late")
    assert time.time() - t0 >= 0.3
    assert fence.read_ack(ctx.storage, ctx.layout, "late")["expired"] == ["dead"]


def test_a_replica_whose_process_is_gone_fences_nothing_and_is_removed(root):
    """Killed without deregistering (kill -9): on this host its pid no longer exists, so it
    answers nothing more; its file must not cost every later acknowledgement a lease."""
    import socket
    import subprocess
    import sys

    storage, layout = root
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a pid that existed and is gone (reuse within this test is not a concern)
    reg = fence.Registration("killed", 2.0, 0.05, view_at=999.0, host=socket.gethostname())
    reg.pid = p.pid
    fence.write_registration(storage, layout, reg)
    alive = fence.Registration("alive", 2.0, 0.05, view_at=1000.2, host=socket.gethostname())
    alive.pid = os.getpid()
    fence.write_registration(storage, layout, alive)
    clock = _Clock(1000.0)
    out = fence.await_fence(storage, layout, 1000.0, clock=clock, sleep=clock.sleep)
    assert out["dead"] == ["killed"] and out["confirmed"] == ["alive"] and clock.t == 1000.0
    assert [r.replica for r in fence.list_registrations(storage, layout)] == ["alive"]


def test_registration_updates_skip_fsync_but_stay_atomic(root, monkeypatch):
    """A replica's frequent updates are replaced without fsync (on a local disk); the first
    registration is fsync'd. Either way readers see the whole new file, no temp file stays."""
    storage, layout = root
    syncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (syncs.append(fd), real_fsync(fd)))
    reg = fence.Registration("g1", 2.0, 0.05)
    fence.write_registration(storage, layout, reg)  # durable by default
    assert syncs
    syncs.clear()
    for t in (1000.0, 1000.1, 1000.2):
        reg.view_at = t
        fence.write_registration(storage, layout, reg, durable=False)
        (listed,) = fence.list_registrations(storage, layout)
        assert listed.view_at == t
    assert syncs == []
    assert sorted(os.listdir(storage.full(fence.gateways_dir(layout)))) == ["g1.json"]
    clock = _Clock(1000.0)
    out = fence.await_fence(storage, layout, 1000.1, clock=clock, sleep=clock.sleep)
    assert out["confirmed"] == ["g1"]
