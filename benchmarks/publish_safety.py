"""Publishing under races and kill -9: two `forget` processes on one run, and killed executions.

Run:  .venv/bin/python benchmarks/publish_safety.py --out results/publish_safety [--quick]

Setup: one tiny digits run (configs/digits.yaml, 2 shards x 2 slices, hidden [16], 1 epoch)
trained in this process, no Ray; every trial works on a fresh copy of its storage root and
runs the real command, ``python -m ray_unlearn.cli forget`` (no cluster), as subprocesses.

1. races (full 20, quick 4): two ``forget`` processes started together, each for another
   owner; in the even trials both owners' rows lie in one shard (the case where both retrain
   the same versions), in the odd ones in different shards. Checked from outside the
   engine's own records: both exit 0; ``races_unfinished``: trials where a request is not
   ``done``; ``races_lost_updates``: trials where the published store does not hold exactly
   the deletions the log says are done, i.e. some live version was trained on a deleted
   row, or a shard's chain is not the one a retrain without every deleted row gives (each
   live version's sample list, read from its folder, must equal the shard's plan members
   up to its slice minus the deleted rows: replayed from the plan, not from the registry).
2. kill trials (full 20, quick 4): ``forget`` of one owner is killed with SIGKILL, in the
   even trials at a named point of the execution chosen at random
   (``RAY_UNLEARN_TEST_PAUSE_AT``: lease taken, trained, intent written, registry switched,
   in the middle of retiring, retired, requests done), in the odd ones after a random delay
   in [0, 1.2 x the median duration of an unkilled ``forget``] (wherever it happens to be,
   including before the request is logged). Then the next ``forget`` (another owner) runs
   to completion: it recovers first. ``kill_trials_stray_versions``: trials that, after it,
   leave any version folder outside the live chain holding weights or other data-derived
   files of a deleted row (every folder on disk is listed; its sample list decides);
   ``kill_trials_unfinished``: trials where the killed request (if it was logged) is not
   ``done`` after the next ``forget``; ``stray_before_recovery``: how many trials had data
   files outside the live chain right after the kill (what recovery had to clean up).

Output: <out>/publish_safety.json with the keys above and per-trial ``race_details`` and
``kill_details``. Targets: races_lost_updates = races_unfinished = 0 in 20 races;
kill_trials_stray_versions = 0 of 20.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ray_unlearn.platform.core.config import load_config  # noqa: E402
from ray_unlearn.platform.core.deletion_log import RequestState  # noqa: E402
from ray_unlearn.platform.core.plan import TEST  # noqa: E402
from ray_unlearn.platform.core.publish import PAUSE_POINTS, stray_versions  # noqa: E402
from ray_unlearn.platform.core.run import create_run, open_run  # noqa: E402
from ray_unlearn.platform.core.runtime import train_all_shards  # noqa: E402

RUN = "bench"
TINY = [
    "training.epochs=1",
    "partition.shards=2",
    "partition.slices=2",
    "model.hidden=[16]",
]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def _forget(store: Path, owner: str, rid: str, **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ray_unlearn.cli", "forget", "--run", RUN, "--owner", owner]
    cmd += ["--request-id", rid, "--storage", str(store), "--json"]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env)
    )


def _owners(ctx) -> dict[int, list[str]]:
    """shard -> owners whose rows all lie in that training shard."""
    out: dict[int, list[str]] = {}
    for owner in np.unique(ctx.plan.owner_ids):
        shards = set(ctx.plan.locate(ctx.plan.samples_of_owner(owner))[0].tolist())
        if len(shards) == 1 and TEST not in shards:
            out.setdefault(shards.pop(), []).append(str(owner))
    return out


def check_store(store: Path) -> dict:
    """What the store holds, checked against the plan and the log (not the engine's records)."""
    ctx = open_run(str(store), RUN)
    log, ms = ctx.deletion_log, ctx.model_store
    deleted = np.fromiter(log.deleted_sample_ids(), dtype=np.int64)
    reg = ms.registry()
    wrong_chains = []
    for k, entry in sorted(reg.shards.items()):
        ids, slices = ctx.plan.shard_members(k)
        keep = ~np.isin(ids, deleted)
        ids, slices = ids[keep], slices[keep]
        if entry.empty:
            if len(ids):
                wrong_chains.append({"shard": k, "why": "empty, but rows remain"})
            continue
        for r, vid in enumerate(entry.chain):
            expected = np.sort(ids[slices <= r])
            if not np.array_equal(np.sort(ms.sample_ids(vid)), expected):
                wrong_chains.append({"shard": k, "slice": r, "version": vid})
    holding = ms.live_versions_containing(deleted, reg)
    stray = stray_versions(ctx)
    stray_deleted = {}
    for vid, info in stray.items():
        if not info["files"]:
            continue
        try:
            hit = int(np.isin(deleted, ms.sample_ids(vid)).sum())
        except Exception:  # no sample list: it may hold anything
            hit = -1
        if hit:
            stray_deleted[vid] = hit
    return {
        "live_versions_holding_deleted_rows": holding,
        "wrong_chains": wrong_chains,
        "stray_versions": sorted(stray),
        "stray_with_deleted_rows": stray_deleted,
        "states": {r.request_id: r.state.value for r in log.records()},
    }


def race(template: Path, work: Path, owners: list[str], i: int) -> dict:
    store = work / f"race-{i}"
    shutil.copytree(template, store)
    t0 = time.perf_counter()
    procs = [_forget(store, o, f"race{i}-{j}") for j, o in enumerate(owners)]
    outs = [p.communicate(timeout=900) for p in procs]
    seconds = time.perf_counter() - t0
    chk = check_store(store)
    rids = [f"race{i}-{j}" for j in range(len(owners))]
    waited = any("waiting" in err for _, err in outs)
    rec = {
        "trial": i,
        "owners": owners,
        "exit_codes": [p.returncode for p in procs],
        "seconds": seconds,
        "second_waited_for_lease": waited,
        "unfinished": [r for r in rids if chk["states"].get(r) != RequestState.DONE.value],
        "lost_update": bool(chk["live_versions_holding_deleted_rows"] or chk["wrong_chains"]),
        **chk,
        "stderr_tail": [err[-600:] for _, err in outs if any(p.returncode for p in procs)],
    }
    shutil.rmtree(store)
    return rec


def kill_trial(template: Path, work: Path, owners: list[str], i: int, rng, delay_max: float):
    store = work / f"kill-{i}"
    shutil.copytree(template, store)
    marker = work / f"kill-{i}.paused"
    env = {}
    if i % 2 == 0:
        point = rng.choice(PAUSE_POINTS)
        env = {
            "RAY_UNLEARN_TEST_PAUSE_AT": point,
            "RAY_UNLEARN_TEST_PAUSE_FILE": str(marker),
        }
    else:
        point = None
        delay = rng.uniform(0, delay_max)
    victim = _forget(store, owners[0], f"victim{i}", **env)
    t0 = time.perf_counter()
    if point is not None:
        while not marker.exists() and victim.poll() is None:
            time.sleep(0.05)
    else:
        while time.perf_counter() - t0 < delay and victim.poll() is None:
            time.sleep(0.01)
    finished_before_kill = victim.poll() is not None
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    killed_at = time.perf_counter() - t0
    before = check_store(store)
    nxt = _forget(store, owners[1], f"next{i}")
    _, err = nxt.communicate(timeout=900)
    after = check_store(store)
    logged = f"victim{i}" in after["states"]
    rec = {
        "trial": i,
        "owners": owners,
        "pause_point": point,
        "killed_after_s": killed_at,
        "finished_before_kill": finished_before_kill,
        "victim_logged": logged,
        "victim_state_after_kill": before["states"].get(f"victim{i}"),
        "stray_with_data_before_recovery": len(before["stray_versions"]),
        "next_exit_code": nxt.returncode,
        "victim_state_after_next": after["states"].get(f"victim{i}"),
        "unfinished": logged and after["states"][f"victim{i}"] != RequestState.DONE.value,
        "stray_with_deleted_rows": after["stray_with_deleted_rows"],
        "stray_versions_after": after["stray_versions"],
        "live_versions_holding_deleted_rows": after["live_versions_holding_deleted_rows"],
        "wrong_chains": after["wrong_chains"],
        "stderr_tail": err[-600:] if nxt.returncode else "",
    }
    shutil.rmtree(store)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/publish_safety")
    ap.add_argument("--quick", action="store_true", help="4 races and 4 kill trials")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=None, help="races and kill trials each")
    args = ap.parse_args()
    n = args.trials or (4 if args.quick else 20)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="publish-safety-"))
    try:
        cfg = load_config(str(ROOT / "configs" / "digits.yaml"), [f"storage={work / 'tpl'}", *TINY])
        ctx = create_run(cfg, run_id=RUN)
        train_all_shards(ctx)
        template = work / "tpl"
        by_shard = _owners(ctx)
        shards = sorted(by_shard)
        races = []
        for i in range(n):
            if i % 2 == 0:  # both owners in one shard
                k = shards[i // 2 % len(shards)]
                owners = rng.sample(by_shard[k], 2)
            else:
                owners = [rng.choice(by_shard[shards[0]]), rng.choice(by_shard[shards[1]])]
            races.append(race(template, work, owners, i))
            print(f"race {i}: exits {races[-1]['exit_codes']}, lost {races[-1]['lost_update']}")
        # a lone forget's duration, for the random kill delays: the races' solo-equivalent
        typical = statistics.median(r["seconds"] for r in races) / 1.5
        kills = []
        for i in range(n):
            k = shards[i % len(shards)]
            owners = rng.sample(by_shard[k], 2)
            kills.append(kill_trial(template, work, owners, i, rng, 1.2 * typical))
            print(
                f"kill {i} at {kills[-1]['pause_point'] or round(kills[-1]['killed_after_s'], 2)}"
                f": stray with deleted rows {kills[-1]['stray_with_deleted_rows']}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        "races": len(races),
        "races_exit_nonzero": sum(any(r["exit_codes"]) for r in races),
        "races_lost_updates": sum(r["lost_update"] for r in races),
        "races_unfinished": sum(bool(r["unfinished"]) for r in races),
        "races_one_shard": sum(r["trial"] % 2 == 0 for r in races),
        "races_second_waited": sum(r["second_waited_for_lease"] for r in races),
        "kill_trials": len(kills),
        "kill_trials_stray_versions": sum(
            bool(k["stray_with_deleted_rows"] or k["live_versions_holding_deleted_rows"])
            for k in kills
        ),
        "kill_trials_unfinished": sum(bool(k["unfinished"]) for k in kills),
        "kill_trials_next_exit_nonzero": sum(k["next_exit_code"] != 0 for k in kills),
        "kill_trials_wrong_chains": sum(bool(k["wrong_chains"]) for k in kills),
        "stray_before_recovery": sum(k["stray_with_data_before_recovery"] > 0 for k in kills),
        "typical_forget_s": typical,
        "quick": args.quick,
        "race_details": races,
        "kill_details": kills,
    }
    (out / "publish_safety.json").write_text(json.dumps(doc, indent=1))
    summary = {k: v for k, v in doc.items() if not k.endswith("_details")}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
