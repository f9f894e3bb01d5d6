"""Crash-safe publishing without Ray: the lease, the registry's compare-and-swap, recovery
after a crash at each step of a publish, and the audit of the store itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from ray_unlearn.platform.core import publish as publish_mod
from ray_unlearn.platform.core.audit import audit
from ray_unlearn.platform.core.deletion_log import RequestState
from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
from ray_unlearn.platform.core.lease import Lease, LeaseError
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.run import create_run, open_run
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.core.storage import Storage
from ray_unlearn.platform.core.versions import KEEP_GENERATIONS, RegistryConflict
from tests.conftest import assert_equals_scratch, tiny_config


# -- the lease -------------------------------------------------------------------------------
def test_lease_acquire_release_and_wait(tmp_path):
    st = Storage(tmp_path)
    a = Lease(st, "runs/r/lease", holder="a", ttl_s=5)
    b = Lease(st, "runs/r/lease", holder="b", ttl_s=5)
    assert a.acquire() == 1
    a.check()
    with pytest.raises(LeaseError, match="held by a"):
        b.acquire(timeout_s=0.3)
    waited = []
    t = threading.Thread(target=lambda: waited.append(b.acquire(on_wait=lambda r: None)))
    t.start()
    time.sleep(0.4)
    assert not waited  # still waiting while a holds it
    a.release()
    t.join(5)
    assert waited == [2] and b.generation == 2
    with pytest.raises(LeaseError, match="not held"):
        a.check()
    b.release()


def test_lease_renewal_keeps_it_and_expiry_frees_it(tmp_path):
    st = Storage(tmp_path)
    a = Lease(st, "lease", holder="a", ttl_s=0.6)
    a.acquire()
    time.sleep(1.2)  # two ttl: only renewals (every ttl/3) keep it
    a.check()
    b = Lease(st, "lease", holder="b", ttl_s=0.6)
    with pytest.raises(LeaseError):
        b.acquire(timeout_s=0.3)
    # a holder that stops renewing (a hung process) loses it once its expiry passes
    a._stop.set()
    a._renewer.join()
    assert b.acquire(timeout_s=3) == 2
    with pytest.raises(LeaseError, match="expired|taken over"):
        a.check()
    b.release()


def test_lease_of_a_dead_process_is_taken_over_at_once(tmp_path):
    st = Storage(tmp_path)
    code = (
        "import sys; from ray_unlearn.platform.core.storage import Storage;"
        "from ray_unlearn.platform.core.lease import Lease;"
        f"Lease(Storage({str(tmp_path)!r}), 'lease', holder='victim', ttl_s=600).acquire();"
        "print('held', flush=True); import time; time.sleep(600)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        taker = Lease(st, "lease", holder="taker", ttl_s=5)
        with pytest.raises(LeaseError, match="victim"):
            taker.acquire(timeout_s=0.3)
        p.kill()  # kill -9: no release, the lease file still says held for 600 s
        p.wait()
        assert taker.acquire(timeout_s=2) == 2
        taker.release()
    finally:
        p.kill()
        p.wait()


def test_two_takers_of_a_free_lease_one_wins(tmp_path):
    st = Storage(tmp_path)
    Lease(st, "lease", holder="old", ttl_s=5).acquire()  # then "dies": expire it by hand
    rec = st.read_json("lease/00000001.json")
    st.write_json("lease/00000001.json", {**rec, "expires_at": 0.0})
    takers = [Lease(st, "lease", holder=f"t{i}", ttl_s=5) for i in range(6)]
    barrier = threading.Barrier(len(takers))
    won: list[int] = []

    def take(lease):
        barrier.wait()
        try:
            won.append(lease.acquire(timeout_s=0.5))
        except LeaseError:
            pass

    threads = [threading.Thread(target=take, args=(t,)) for t in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won == [2]  # exactly one taker, the next generation
    holder = next(t for t in takers if t.generation == 2)
    holder.check()
    holder.release()


def test_lease_prunes_old_generations(tmp_path):
    st = Storage(tmp_path)
    for _ in range(12):
        lease = Lease(st, "lease", ttl_s=5)
        lease.acquire()
        lease.release()
    assert len(st.listdir("lease")) <= 6 and Lease(st, "lease").current()[0] == 12


# -- shared tiny run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_store(tmp_path_factory):
    """One tiny trained run (2 shards x 2 slices), copied afresh for each test."""
    base = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(
        base,
        "training.epochs=1",
        "partition.shards=2",
        "partition.slices=2",
        "model.hidden=[16]",
    )
    ctx = create_run(cfg, run_id="tiny")
    train_all_shards(ctx)
    return base / "store"


@pytest.fixture
def run(trained_store, tmp_path):
    shutil.copytree(trained_store, tmp_path / "store")
    return open_run(str(tmp_path / "store"), "tiny")


def _owners_in_one_shard(ctx, n=2):
    """``n`` owners whose rows all lie in the same training shard."""
    by_shard: dict[int, list[str]] = {}
    for owner in np.unique(ctx.plan.owner_ids):
        shards = set(ctx.plan.locate(ctx.plan.samples_of_owner(owner))[0].tolist())
        if len(shards) == 1 and TEST not in shards:
            by_shard.setdefault(shards.pop(), []).append(str(owner))
    k, owners = max(by_shard.items(), key=lambda kv: len(kv[1]))
    return k, owners[:n]


# -- the registry's compare-and-swap --------------------------------------------------------
def test_registry_compare_and_swap(run):
    store = run.model_store
    first, second = store.registry(), store.registry()
    g = first.generation
    first.shards[0].meta = {"writer": "first"}
    assert store.write_registry(first) == g + 1
    second.shards[0].meta = {"writer": "second"}
    with pytest.raises(RegistryConflict, match=f"generation {g}"):
        store.write_registry(second)
    assert store.registry().shards[0].meta == {"writer": "first"}  # nothing lost, no clobber
    # a writer killed between the generation file (the switch) and the read-path copy
    reg = store.registry()
    reg.shards[0].meta = {"writer": "crashed"}
    reg.generation += 1
    run.storage.write_json(run.layout.registry_generation(reg.generation), reg.to_json())
    assert store.registry().shards[0].meta == {"writer": "crashed"}
    assert store.registry().generation == g + 2
    for _ in range(KEEP_GENERATIONS + 3):
        store.write_registry(store.registry())
    kept = run.storage.listdir(f"{run.layout.models}/registry")
    assert len(kept) == KEEP_GENERATIONS and store.registry().generation == g + 5 + KEEP_GENERATIONS


def test_registry_of_an_old_run_is_read_and_continued(run):
    store = run.model_store
    doc = run.storage.read_json(run.layout.registry)
    doc.pop("generation")
    shutil.rmtree(run.storage.local_path(f"{run.layout.models}/registry"))
    run.storage.write_json(run.layout.registry, doc)  # the layout before generations
    reg = store.registry()
    assert reg.generation == 0 and sorted(reg.shards) == [0, 1]
    assert store.write_registry(reg) == 1 and store.registry().generation == 1


# -- recovery after a crash at each step of a publish -----------------------------------------
class Killed(BaseException):
    """A simulated kill -9: not an Exception, so the engine's error path does not run."""


def _crash_at(monkeypatch, point):
    real = publish_mod.pause_point

    def pause(name):
        real(name)
        if name == point:
            raise Killed(point)

    monkeypatch.setattr(publish_mod, "pause_point", pause)
    import ray_unlearn.platform.core.engine as unlearning

    monkeypatch.setattr(unlearning, "pause_point", pause)


def _stray_with_data(ctx):
    return {v: i for v, i in publish_mod.stray_versions(ctx).items() if i["files"]}


@pytest.mark.parametrize("point", publish_mod.PAUSE_POINTS)
def test_recovery_after_a_crash_at_each_step(run, monkeypatch, point):
    k, (owner, _) = _owners_in_one_shard(run)
    engine = UnlearningEngine(run, LocalShards(run), executor_name="doomed")
    _crash_at(monkeypatch, point)
    with pytest.raises(Killed):
        engine.forget(owner_id=owner, request_id="r1")
    monkeypatch.undo()
    ctx = open_run(run.storage.uri, "tiny")  # a new process's view
    before = audit(ctx)
    # the audit reports (read-only) what recovery will find: nothing before the first intent
    assert (before["recovery"]["intent"] is None) == (point == "lease-acquired")
    if point in ("registry-switched", "retiring"):
        # the old chain is out of the registry but keeps its weights: the audit sees it
        assert _stray_with_data(ctx) and before["stray_versions"]
    nxt = UnlearningEngine(ctx, LocalShards(ctx), executor_name="next")
    rec = nxt.forget(owner_id=owner, request_id="r1")
    assert rec.state == RequestState.DONE
    # a crash after the requests were done left only the intent: any execution clears it
    assert nxt.execute_pending() == []
    after = audit(ctx)
    assert after["clean"] and after["stray_versions"] == {} and after["manifest_mismatch"] == []
    assert after["recovery"] == {"intent": None, "would_retire": []}
    assert not ctx.storage.exists(ctx.layout.publish_intent)
    ids = ctx.plan.samples_of_owner(owner)
    assert ctx.model_store.live_versions_containing(ids) == {}
    assert_equals_scratch(ctx, k, ids)


def test_a_crash_past_the_switch_is_finished_not_retrained(run, monkeypatch):
    _, (owner, _) = _owners_in_one_shard(run)
    _crash_at(monkeypatch, "registry-switched")
    with pytest.raises(Killed):
        UnlearningEngine(run, LocalShards(run)).forget(owner_id=owner, request_id="r1")
    monkeypatch.undo()
    created = run.model_store.registry().live_versions()
    ctx = open_run(run.storage.uri, "tiny")
    engine = UnlearningEngine(ctx, LocalShards(ctx), executor_name="next")
    rec = engine.forget(owner_id=owner, request_id="r1")
    assert engine.last_recovery["switched"] and engine.last_recovery["finished_requests"] == ["r1"]
    assert rec.details["recovered_by"] == "next" and rec.versions_created
    assert ctx.model_store.registry().live_versions() == created  # no second retrain


def test_audit_flags_a_stray_version_holding_deleted_rows(run):
    k, (owner, _) = _owners_in_one_shard(run)
    rec = UnlearningEngine(run, LocalShards(run)).forget(owner_id=owner)
    assert audit(run)["clean"]
    old = rec.versions_retired[-1]
    # weights back in a retired version's folder (a purge that never happened)
    run.storage.write_bytes(run.layout.version_weights(old), b"weights")
    a = audit(run)
    assert not a["clean"] and set(a["stray_violations"]) == {old}
    assert a["stray_versions"][old]["files"] == ["weights.safetensors"]
    assert not audit(run, owner_id=owner)["clean"]
    # an orphan: a complete version no registry names, manifest `live`, rows not deleted
    m = run.model_store.manifest(run.model_store.registry().shards[k].chain[0])
    orphan = "s099-r00-g0099"
    run.storage.write_json(run.layout.version_manifest(orphan), {**m, "version": orphan})
    run.storage.write_bytes(run.layout.version_weights(orphan), b"w")
    shutil.copy(
        run.storage.local_path(run.layout.version_samples(m["version"])),
        run.storage.local_path(run.layout.version_samples(orphan)),
    )
    a = audit(run)
    assert orphan in a["stray_versions"] and orphan not in a["stray_violations"]
    assert {"version": orphan, "manifest_state": "live", "in_registry": False} in a[
        "manifest_mismatch"
    ]


# -- processes racing on one run (the CLI, no cluster) ----------------------------------------
def _cli_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    return {**env, **extra}


def _forget(store, owner, rid, **env):
    cmd = [sys.executable, "-m", "ray_unlearn.cli", "forget", "--run", "tiny"]
    cmd += ["--owner", owner, "--request-id", rid, "--storage", str(store), "--json"]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cli_env(**env)
    )


def test_two_forget_processes_race_on_one_run(run):
    k, owners = _owners_in_one_shard(run)
    store = run.storage.uri
    procs = [_forget(store, o, f"race-{i}") for i, o in enumerate(owners)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    ctx = open_run(store, "tiny")
    assert all(ctx.deletion_log.get(f"race-{i}").state == RequestState.DONE for i in range(2))
    a = audit(ctx)
    assert a["clean"] and a["stray_versions"] == {} and a["pending_requests"] == 0
    both = np.concatenate([ctx.plan.samples_of_owner(o) for o in owners])
    assert ctx.model_store.live_versions_containing(both) == {}
    assert_equals_scratch(ctx, k, both)  # the chain that deleted both owners


def test_kill_9_after_the_switch_then_the_next_forget_finishes(run, tmp_path):
    _, (owner, other) = _owners_in_one_shard(run)
    store, marker = run.storage.uri, tmp_path / "paused"
    p = _forget(
        store,
        owner,
        "victim",
        RAY_UNLEARN_TEST_PAUSE_AT="registry-switched",
        RAY_UNLEARN_TEST_PAUSE_FILE=str(marker),
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()[-2000:]
            time.sleep(0.1)
    finally:
        p.kill()
        p.communicate()
    ctx = open_run(store, "tiny")
    assert ctx.deletion_log.get("victim").state == RequestState.EXECUTING
    # the store itself shows the old chain outside the registry with its weights (the
    # request is not done, so these are not yet violations of a finished deletion)
    stray = audit(ctx)["stray_versions"]
    assert stray and all("weights.safetensors" in s["files"] for s in stray.values())
    q = _forget(store, other, "next")
    _, err = q.communicate(timeout=600)
    assert q.returncode == 0, err[-2000:]
    ctx = open_run(store, "tiny")
    assert ctx.deletion_log.get("victim").state == RequestState.DONE
    assert ctx.deletion_log.get("next").state == RequestState.DONE
    a = audit(ctx)
    assert a["clean"] and a["stray_versions"] == {}


def test_an_executor_that_lost_its_lease_publishes_nothing(run, monkeypatch):
    _, (owner, _) = _owners_in_one_shard(run)
    before = run.model_store.registry()
    real = publish_mod.pause_point

    def taken_over(name):
        real(name)
        if name == "trained":  # another executor takes over (say, after a long stall)
            lease = Lease(run.storage, run.layout.lease)
            gen, rec = lease.current()
            run.storage.write_json(f"{run.layout.lease}/{gen + 1:08d}.json", {**rec, "pid": 0})

    monkeypatch.setattr(publish_mod, "pause_point", taken_over)
    with pytest.raises(LeaseError, match="taken over"):
        UnlearningEngine(run, LocalShards(run)).forget(owner_id=owner, request_id="r1")
    monkeypatch.undo()
    reg = run.model_store.registry()
    assert reg.generation == before.generation and reg.live_versions() == before.live_versions()
    # not marked failed: the transitions belong to the executor holding the lease now
    assert run.deletion_log.get("r1").state == RequestState.EXECUTING
    for name in run.storage.listdir(run.layout.lease):  # the taker dies in turn
        path = f"{run.layout.lease}/{name}"
        run.storage.write_json(path, {**run.storage.read_json(path), "expires_at": 0.0})
    ctx = open_run(run.storage.uri, "tiny")
    assert UnlearningEngine(ctx, LocalShards(ctx)).forget(
        owner_id=owner, request_id="r1"
    ).state == (RequestState.DONE)
    assert audit(ctx)["clean"] and audit(ctx)["stray_versions"] == {}
