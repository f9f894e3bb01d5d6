"""Serving under deletions: every ERASER preset and both baselines, over HTTP, in one run.

Run:  .venv/bin/python benchmarks/serving.py --out results/serving [--quick]

One embedded Ray (2 CPUs) and one Serve HTTP proxy on 127.0.0.1 (a free port). For every
policy in ``ray_unlearn.platform.serving.policies.PRESETS`` (the ERASER presets, then the baselines
"inference-oblivion" and "naive-postponed"; ``--quick``: one safe lazy/wait preset and
naive-postponed, 12 s of stream, no warm-up deletions, about a minute per policy) and every
deletion rate:

1. one run is trained in this process, once: scikit-learn's digits (configs/digits.yaml,
   1434 training / 363 test rows, owners of ~4 samples) with ``partition.shards=8``,
   ``partition.slices=4``, ``unlearning.aggregation=vote``, ``training.epochs=E`` and
   ``model.hidden=W`` (full: 160 epochs, W = [512, 512], so that retraining a shard costs
   1-3 s, as unlearning costs real time in practice and as ERASER assumes; quick: 40 and
   [128]; ``--epochs``). Every (policy, rate) serves a private copy of that run, so all see
   the same plan and the same models. Vote because its certificate is combinatorial: an
   instance on which the 8 shards agree stays certified while at most 3 shards have a
   deletion pending (8-m > m), so certificates are common while a few deletions are
   pending.
2. ``build_app({storage, run_id, policy, num_replicas: 2})`` is deployed with ``serve.run``
   (app "ray-unlearn", route "/"): two gateway replicas, each fencing itself through the
   storage root (docs/serving.md). Every policy gets the same shortened deadline
   (``{"preset": name, "deadline_s": D}``; D = 10 s full, 5 s quick; the presets' 60 s
   would let deferred deletions wait past the end of the stream); the batched presets keep
   their batch of 8 / window of 10 s.
3. warm-up: /healthz, the run's detached executor answers ``ping`` (the gateway starts it),
   20 predictions, then one deletion per shard (an owner of that shard, a 0.1 s
   per-request deadline so that every timing executes it at once) and wait until none is
   pending (every shard actor and shard replica has then retrained / loaded a new version
   once), then 20 predictions more. All counters below are deltas from the end of warm-up.
4. the stream (seeded, identical for every policy at a given rate), open loop:
   single-instance predictions drawn from the run's held-out test set arrive as a Poisson
   process of rate rho (10/s) on a seeded schedule inside [0, H) (full: H = 90 s, ~900
   predictions per record; quick: H = 20 s), each POSTed to /v1/predict at its time
   whatever the gateway is doing (up to 512 connections, so requests wait in the gateway);
   meanwhile deletions of distinct owners with training data (``pick_owners``) arrive as a
   Poisson process of rate lambda per second inside [0, H) (full: lambda in {0.25, 1};
   quick: {1}), half of them POSTed to /v1/forget with the bearer token (202 expected), half
   outside the gateway: the first ``cli_deletions`` by ``ray-unlearn forget --no-wait`` (a
   process each: seconds of CPU, so only a few), the rest by the Python API
   (``submit_request``) from this long-lived client process. Every policy
   therefore sees the same predictions and deletions at the same offsets. Open loop because
   a closed loop slows its own arrivals while the gateway blocks, which hides the waiting
   a blocking policy imposes on its clients. inference-oblivion executes deletions one at a
   time (``max_batch=1``), in arrival order; the ERASER presets execute all that is due.
5. drain: poll GET /v1/stats until ``pending_deletions`` is 0 (at most D + 60 s), read the
   counters, ``serve.delete`` the app (the replicas flush their answer journals), replay the
   journals against the manifests and the log (``ray_unlearn.platform.serving.receipts.replay``, as
   ``ray-unlearn verify-exposure`` does) and kill the run's executor actor.

Output: ``<out>/serving.json``, ``<out>/serving.png`` (latency CDF per policy, log x, one
panel per rate) and a table. The JSON has one record per (policy, rate), with a ``rate`` key
(deletions per second), plus ``summary`` (per rate) and ``settings``. Record keys:

* policy                 preset name (``policy_effective``: the name with the deadline).
* latency_mean_ms, latency_p50_ms, latency_p99_ms
                         client-side wall time of each answered (2xx) prediction: from its
                         scheduled arrival to the parsed response (client queue + HTTP
                         proxy + gateway + shard replicas + any wait for unlearning).
* mean_wait_ms           mean over answered predictions of the time spent waiting for
                         unlearning: for an answer marked ``waited`` by the gateway, its
                         latency minus the median latency of this record's ``certified``
                         answers (at least 0); 0 for every other answer.
* unlearning_compute_s   CPU seconds of retraining the gateway's executions reported during
                         the stream and the drain (GET /v1/stats ``unlearning_cpu_s``, delta;
                         per execution batch: the shards' summed training CPU time). CPU, not
                         wall, time: on 2 shared cores a retrain's wall time grows with the
                         serving load beside it, which would charge a policy for serving
                         more; ``unlearning_train_wall_s`` has the wall seconds.
* violations (= exposure) answers the replay finds committed after a deletion's
                         acknowledgement from a version holding its samples, or with a
                         certificate that fails for the shards they excluded: evidence from
                         outside the gateway, not its labels (``stale_labelled`` counts the
                         answers the gateway itself marked ``stale``; ``exposure_stats`` its
                         own counter). ``answers``: answers in the journals replayed
                         (``journal_replicas``: how many replicas wrote them).
* ack_ms_p50, ack_ms_p99 time to acknowledge a deletion (fenced on both replicas): the POST
                         for HTTP, ``submit_request`` for the API, the CLI's own
                         ``ack_seconds``; ``ack_ms_by_channel`` (p50), ``deletions_by_channel``.
* accuracy               answered labels vs the true test labels.
* certified_fraction     answers marked ``certified`` / predictions sent. The gateway marks
                         an answer certified also when no deletion is pending at all.
* throughput_rps         predictions sent / stream wall time (first send to last answer).
* dropped                predictions that got a transport error or a non-2xx status, except
                         503 from a policy whose uncertified answers are rejects
                         (``rejected``). Target 0, including across the ``swaps``.
* answered               answers by mode (certified, excluded, waited, stale).
* also: rate, n_predictions, n_deletions (sent, accepted), executions, swaps,
  unlearning_wall_s, unexecuted_at_end, stream_s, drain_s, latency_p90_ms / max, the
  gateway's own mean latency, deletion_ack_mean_ms, setup timings, load average.

Summary per rate: ``best_certified_preset`` = the lowest latency_mean_ms among the ERASER
presets (not the baselines) with exposure 0, dropped 0 and rejected 0; its
``latency_reduction`` = 1 - mean / mean(inference-oblivion) and ``compute_reduction`` =
1 - compute / compute(inference-oblivion); also every preset meeting both targets.
Targets (reported, not asserted): latency_reduction >= 0.9 and compute_reduction >= 0.3 for
the best certified preset; zero violations by replay for every safe preset
(``zero_violations_every_safe_preset``) while naive-postponed shows some
(``naive_postponed_exposes``); dropped 0.
Timings come from this machine in this run only; another process may share the 2 cores, so
compare policies within one run (the load average is recorded per record).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import ray
import torch
from ray import serve

import ray_unlearn
from ray_unlearn.harness import free_port, pick_owners
from ray_unlearn.platform.core.config import load_config
from ray_unlearn.platform.core.engine import submit_request
from ray_unlearn.platform.core.run import create_run, open_run
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.serving import fence
from ray_unlearn.platform.serving.journal import read_journal
from ray_unlearn.platform.serving.policies import PRESETS, get_policy
from ray_unlearn.platform.serving.receipts import replay
from ray_unlearn.serve.app import build_app
from ray_unlearn.serve.gateway import TOKEN_ENV
from ray_unlearn.train.executor import executor_actor_name
from ray_unlearn.train.session import NAMESPACE

REPO = Path(__file__).resolve().parents[1]
APP = "ray-unlearn"
BASELINES = ("inference-oblivion", "naive-postponed")
OVERRIDES = ["partition.shards=8", "partition.slices=4", "unlearning.aggregation=vote"]

FULL = {
    "prediction_rate": 10.0,  # predictions per second, open loop (Poisson)
    "horizon_s": 90.0,  # predictions and deletions arrive in [0, H)
    "rates": [0.25, 1.0],  # deletions per second (Poisson)
    "connections": 512,  # HTTP connections: enough that requests wait in the gateway, not here
    "deadline_s": 10.0,  # every policy's deadline
    "warmup_predictions": 20,
    # the served model: a shard retrain costs seconds (1-3 s here), as unlearning does in
    # practice and as ERASER assumes; 0.25/s leaves one-by-one execution idle part of the
    # time, 1/s does not
    "epochs": 160,
    "hidden": [512, 512],
    "replicas": 2,  # gateway replicas, each fencing itself
    "cli_deletions": 2,  # deletions sent by `ray-unlearn forget --no-wait` (seconds of CPU each)
    "warmup_deletions": True,
}
QUICK = {
    "prediction_rate": 10.0,
    "horizon_s": 12.0,
    "rates": [1.0],
    "connections": 512,
    "deadline_s": 5.0,
    "warmup_predictions": 20,
    "epochs": 40,
    "hidden": [128],
    "replicas": 2,
    "cli_deletions": 1,
    "warmup_deletions": False,  # about a minute in all: one safe preset and the naive one
}
SEED = 0
JSON_HEADERS = {"content-type": "application/json"}


def _pct(a: np.ndarray, q: float) -> float | None:
    return float(np.percentile(a, q)) if len(a) else None


# -- the stream ------------------------------------------------------------------------------


def deletion_schedule(rate: float, horizon: float, seed: int) -> np.ndarray:
    """Arrival offsets (s) of a Poisson process of ``rate`` per second in [0, horizon)
    (none for rate 0: the no-deletion baseline of the same client load)."""
    if rate <= 0:
        return np.zeros(0)
    rng = np.random.default_rng([seed, int(round(rate * 1000))])
    times, t = [], 0.0
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= horizon:
            return np.asarray(times)
        times.append(t)


def warmup_owners(ctx, seed: int) -> list[str]:
    """One training owner per shard (seeded), so that warm-up retrains every shard once."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for k in range(ctx.config.partition.shards):
        owners = np.unique(ctx.plan.owner_ids[ctx.plan.shards == k])
        if len(owners):
            out.append(str(rng.choice(owners)))
    return out


async def _drain(client: httpx.AsyncClient, timeout: float) -> tuple[dict, float, bool]:
    """Wait until no deletion is pending; returns (stats, seconds, drained)."""
    t0 = time.perf_counter()
    while True:
        stats = (await client.get("/v1/stats")).json()
        if stats["pending_deletions"] == 0:
            return stats, time.perf_counter() - t0, True
        if time.perf_counter() - t0 > timeout:
            return stats, time.perf_counter() - t0, False
        await asyncio.sleep(0.2)


SUMMED_STATS = ("executions", "unlearning_compute_s", "unlearning_cpu_s", "unlearning_wall_s",
                "swaps", "exposure")  # fmt: skip


async def _stats_all(client: httpx.AsyncClient, replicas: int, tries: int = 60) -> dict:
    """GET /v1/stats of every gateway replica, summed. The proxy sends each call to one
    replica, and each counts only its own executions, swaps and predictions, so one call
    would mix replicas between the before and after snapshots. ``stats_replicas``: how many
    answered (fewer than ``replicas`` if the proxy never routed to one in ``tries`` calls)."""
    seen: dict[str, dict] = {}
    for _ in range(tries):
        doc = (await client.get("/v1/stats")).json()
        seen[doc["replica"]] = doc
        if len(seen) >= replicas:
            break
    docs = list(seen.values())
    out = {k: sum(d[k] for d in docs) for k in SUMMED_STATS}
    out["pending_deletions"] = max(d["pending_deletions"] for d in docs)
    out["timing"] = {
        k: (max if k.endswith("_max_s") else sum)(d["timing"][k] for d in docs)
        for k in docs[0]["timing"]
    }
    out["stats_replicas"] = len(docs)
    return out


def _role(cmd: str) -> str:
    """Which part of the benchmark a process is, from its command line (a Ray worker sets it
    to its actor: "ray::ServeReplica:ray-unlearn:shard_3", "ray::ShardActor", ...)."""
    if cmd.startswith("ray::"):
        for key, role in [("gateway", "gateway"), ("shard_", "shard_replicas"),
                          ("ProxyActor", "http_proxy"), ("ServeController", "serve_controller"),
                          ("Executor", "unlearning"), ("ShardActor", "unlearning")]:  # fmt: skip
            if key in cmd:
                return role
        return "ray_system"  # idle workers, dashboard and runtime-env agents
    if "/site-packages/ray/" in cmd:
        return "ray_system"  # gcs_server, raylet, monitors
    if "benchmarks/serving.py" in cmd and "python" in cmd.split(" ", 1)[0]:
        return "client_and_driver"
    if "ray_unlearn.cli" in cmd:
        return "cli_forget"
    return "other_processes"  # not this benchmark: other jobs sharing the cores


def _cpu_snapshot() -> dict[str, Any]:
    """CPU seconds (user + system) of every process by pid with its role, and the machine's
    busy / steal seconds, to tell from their deltas who used the cores during the stream."""
    procs = {}
    for pr in psutil.process_iter(["cmdline", "cpu_times"]):
        t = pr.info.get("cpu_times")
        if t is None:
            continue
        procs[pr.pid] = (_role(" ".join(pr.info.get("cmdline") or [])), t.user + t.system)
    m = psutil.cpu_times()
    idle = m.idle + getattr(m, "iowait", 0.0)
    return {"procs": procs, "busy": sum(m) - idle - getattr(m, "steal", 0.0),
            "steal": getattr(m, "steal", 0.0), "at": time.perf_counter()}  # fmt: skip


def _cpu_used(a: dict, b: dict) -> dict[str, Any]:
    """Cores used between two snapshots, by role (a process born meanwhile counts from 0;
    one that ended meanwhile, e.g. a CLI forget, is missed) and for the whole machine."""
    wall = b["at"] - a["at"]
    by_role: dict[str, float] = {}
    for pid, (role, t) in b["procs"].items():
        t0 = a["procs"].get(pid, (role, 0.0))[1]
        by_role[role] = by_role.get(role, 0.0) + max(0.0, t - t0)
    return {
        "wall_s": wall,
        "cores_by_role": {k: round(v / wall, 3) for k, v in sorted(by_role.items())},
        "machine_busy_cores": (b["busy"] - a["busy"]) / wall,
        "machine_steal_cores": (b["steal"] - a["steal"]) / wall,
        "machine_cores": psutil.cpu_count(),
    }


async def _warmup(client, auth, bodies, owners, n, deadline_s) -> dict:
    """Predictions, then (unless ``owners`` is empty) one deletion per shard executed at
    once, so every shard actor and replica has retrained / loaded a new version once."""
    t0 = time.perf_counter()
    for i in range(n):
        r = await client.post("/v1/predict", content=bodies[i % len(bodies)], headers=JSON_HEADERS)
        r.raise_for_status()
    for o in owners:
        # A short per-request deadline makes every timing execute it at once. The gateway
        # turns deadline_s into an absolute time before the log stamps received_at, so a
        # deadline shorter than that gap is refused (422): retry with a longer one.
        for dl in (1.0, 5.0, 20.0):
            r = await client.post(
                "/v1/forget", json={"owner_id": o, "deadline_s": dl}, headers=auth
            )
            if r.status_code != 422 or "is not after received_at" not in r.text:
                break
        if r.status_code != 202:
            raise RuntimeError(f"warm-up forget {o}: {r.status_code} {r.text[:300]}")
    _, drain_s, ok = await _drain(client, deadline_s + 300)  # 8 retrains; slow under load
    if owners and not ok:
        raise RuntimeError("warm-up deletions did not execute in time")
    for i in range(n):
        r = await client.post("/v1/predict", content=bodies[-1 - i], headers=JSON_HEADERS)
        r.raise_for_status()
    return {"warmup_s": time.perf_counter() - t0, "warmup_drain_s": drain_s}


async def _forget_cli(ctx, owner: str, rid: str) -> tuple[int, float | None]:
    """``ray-unlearn forget --no-wait`` in its own process: (exit code, its ack seconds)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ray_unlearn.cli", "forget", "--run", ctx.run_id,
        "--storage", ctx.storage.uri, "--owner", owner, "--request-id", rid, "--no-wait",
        "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await proc.communicate()
    try:
        return proc.returncode, float(json.loads(out)["ack_seconds"])
    except (ValueError, KeyError):
        return proc.returncode, None


async def run_stream(base: str, token: str, test_x, test_y, owners, p: dict, rate: float,
                     policy, ctx) -> dict[str, Any]:  # fmt: skip
    auth = {"Authorization": f"Bearer {token}"}
    bodies = [json.dumps({"instances": [row.tolist()]}).encode() for row in test_x]
    timeout = httpx.Timeout(600.0, pool=None)  # queued requests wait; their latency counts
    limits = httpx.Limits(max_connections=p["connections"], max_keepalive_connections=64)
    async with (
        httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client,
        httpx.AsyncClient(base_url=base, timeout=timeout) as ctl,
    ):
        warm = await _warmup(
            ctl,
            auth,
            bodies,
            owners["warmup"] if p["warmup_deletions"] else [],
            p["warmup_predictions"],
            p["deadline_s"],
        )
        before = await _stats_all(ctl, p["replicas"])

        times = deletion_schedule(rate, p["horizon_s"], SEED)
        del_owners = owners["stream"][: len(times)]
        if len(del_owners) < len(times):
            raise RuntimeError(f"{len(times)} deletions scheduled, {len(del_owners)} owners")
        # open loop: predictions arrive on a seeded Poisson schedule whatever the gateway
        # does; a latency runs from the scheduled arrival, so time spent queued behind a
        # blocked gateway (or in the client's connection pool) counts
        arrivals = deletion_schedule(p["prediction_rate"], p["horizon_s"], SEED + 1)
        order = np.random.default_rng([SEED, 1]).integers(0, len(test_x), size=len(arrivals))
        preds: list[
            tuple
        ] = []  # (scheduled offset, latency s, status, mode, label, true, server ms)
        # (scheduled offset, sent offset, ack latency s, status, channel); status 202 = ok
        dels: list[tuple] = []
        t_start = time.perf_counter()

        async def predict(t: float, idx: int) -> None:
            delay = t_start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            status, mode, label, server = -1, None, None, None
            try:
                r = await client.post("/v1/predict", content=bodies[idx], headers=JSON_HEADERS)
                status = r.status_code
                if 200 <= status < 300:
                    doc = r.json()
                    pred = doc["predictions"][0]
                    mode, label, server = pred["answered"], pred["label"], doc["latency_ms"]
            except httpx.HTTPError as e:
                mode = f"error:{type(e).__name__}"
            lat = time.perf_counter() - (t_start + t)
            preds.append((float(t), lat, status, mode, label, int(test_y[idx]), server))

        async def send(i: int, t: float, o: str) -> None:
            """Deletion i: even ones through HTTP; odd ones outside the gateway, the first
            few by the CLI (its own process), the rest by the Python API from this
            long-lived client process (a thread: submit_request blocks until fenced)."""
            rid, t0 = f"bench-{rate:g}-{i}", time.perf_counter()
            if i % 2 == 0:
                channel = "http"
                try:
                    r = await ctl.post(
                        "/v1/forget", json={"owner_id": o, "request_id": rid}, headers=auth
                    )
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                ack = time.perf_counter() - t0
            elif i // 2 < p["cli_deletions"]:
                channel = "cli"
                code, ack_s = await _forget_cli(ctx, o, rid)
                status, ack = (202 if code == 0 else -code), ack_s
            else:
                channel = "api"
                try:
                    await asyncio.to_thread(submit_request, ctx, owner_id=o, request_id=rid)
                    status = 202
                except Exception:
                    traceback.print_exc()
                    status = -1
                ack = time.perf_counter() - t0
            dels.append((float(t), t0 - t_start, ack, status, channel))

        async def deleter() -> None:
            sent = []
            for i, (t, o) in enumerate(zip(times, del_owners, strict=True)):
                delay = t_start + t - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent.append(asyncio.create_task(send(i, float(t), o)))
            await asyncio.gather(*sent)

        load0 = os.getloadavg()[0]
        cpu0 = _cpu_snapshot()
        await asyncio.gather(
            deleter(), *[predict(float(t), int(i)) for t, i in zip(arrivals, order, strict=True)]
        )
        cpu = _cpu_used(cpu0, _cpu_snapshot())
        stream_s = max(s + lat for s, lat, *_ in preds)
        load1 = os.getloadavg()[0]
        pending_at_end = (await ctl.get("/v1/stats")).json()["pending_deletions"]
        _, drain_s, drained = await _drain(ctl, p["deadline_s"] + 60)
        after = await _stats_all(ctl, p["replicas"])
    return {
        "preds": preds,
        "dels": dels,
        "before": before,
        "after": after,
        "stream_s": stream_s,
        "drain_s": drain_s,
        "drained": drained,
        "pending_at_stream_end": pending_at_end,
        "loadavg_1m": [load0, load1],
        "cpu": cpu,
        **warm,
    }


# -- one (policy, rate) ----------------------------------------------------------------------


def metrics(name: str, rate: float, s: dict, rejects: bool) -> dict[str, Any]:
    """One record. ``exposure`` and ``violations`` come from the replay of the gateway
    replicas' journals against the manifests and the log (``s["replay"]``), not from the
    gateway's labels (``stale_labelled``)."""
    preds = s["preds"]
    status = np.array([x[2] for x in preds])
    ok = (status >= 200) & (status < 300)
    rejected = int(((status == 503) & rejects).sum())
    dropped = int((~ok).sum()) - rejected
    lat = np.array([x[1] for x in preds])[ok] * 1000
    modes = [x[3] for x in preds if 200 <= x[2] < 300]
    answered: dict[str, int] = {}
    for m in modes:
        answered[m] = answered.get(m, 0) + 1
    modes_a = np.array(modes)
    cert_lat = lat[modes_a == "certified"] if len(lat) else lat
    base = float(np.median(cert_lat)) if len(cert_lat) else 0.0
    waits = np.where(modes_a == "waited", np.maximum(lat - base, 0.0), 0.0) if len(lat) else lat
    correct = [x[4] == x[5] for x in preds if 200 <= x[2] < 300]
    server = np.array([x[6] for x in preds if 200 <= x[2] < 300], dtype=float)
    b, a = s["before"], s["after"]
    d = {k: a[k] - b[k] for k in ("executions", "unlearning_compute_s", "unlearning_cpu_s",
                                  "unlearning_wall_s", "swaps", "exposure")}  # fmt: skip
    del_status = [x[3] for x in s["dels"]]
    td = {k: a["timing"][k] - b["timing"][k] for k in a["timing"] if not k.endswith("_max_s")}
    npred = td["predicts"] or 1
    parts = {k: td[k] / npred * 1000 for k in ("predict_s", "fresh_view_s", "query_s", "wait_s")}
    refreshes, publishes = td["refreshes"] or 1, td["publishes"] or 1
    ack_ms = np.array([x[2] * 1000 for x in s["dels"] if x[3] == 202 and x[2] is not None])
    n = len(preds)
    return {
        "policy": name,
        "rate": rate,
        "latency_mean_ms": float(lat.mean()) if len(lat) else None,
        "latency_p50_ms": _pct(lat, 50),
        "latency_p99_ms": _pct(lat, 99),
        "mean_wait_ms": float(waits.mean()) if len(waits) else None,
        "unlearning_compute_s": d["unlearning_cpu_s"],
        "unlearning_train_wall_s": d["unlearning_compute_s"],
        "exposure": s["replay"]["n_violations"],
        "violations": s["replay"]["n_violations"],
        "answers": s["replay"]["answers"],
        "violation_examples": s["replay"]["violations"][:3],
        "stale_labelled": answered.get("stale", 0),
        "ack_ms_p50": _pct(ack_ms, 50),
        "ack_ms_p99": _pct(ack_ms, 99),
        "ack_fence": s.get("acks"),
        "ack_ms_by_channel": {
            ch: _pct(np.array([x[2] * 1000 for x in s["dels"] if x[4] == ch and x[2]]), 50)
            for ch in ("http", "api", "cli")
        },
        "deletions_by_channel": {
            ch: sum(1 for x in s["dels"] if x[4] == ch) for ch in ("http", "api", "cli")
        },
        "journal_replicas": s["replay"]["replicas"],
        "accuracy": float(np.mean(correct)) if correct else None,
        "certified_fraction": answered.get("certified", 0) / n if n else None,
        "throughput_rps": n / s["stream_s"] if s["stream_s"] else None,
        "dropped": dropped,
        "rejected": rejected,
        "executions": d["executions"],
        "swaps": d["swaps"],
        "answered": answered,
        "exposure_stats": d["exposure"],
        "n_predictions": n,
        "n_answered": int(ok.sum()),
        "dropped_by_status": {
            str(c): int(((status == c) & ~ok).sum()) - (rejected if c == 503 else 0)
            for c in sorted(set(status[~ok].tolist()))
        },
        "n_deletions": len(del_status),
        "deletions_accepted": sum(1 for c in del_status if c == 202),
        "deletion_ack_mean_ms": float(ack_ms.mean()) if len(ack_ms) else None,
        "unlearning_wall_s": d["unlearning_wall_s"],
        "unlearning_compute_per_deletion_s": d["unlearning_cpu_s"] / len(del_status)
        if del_status
        else None,
        "pending_at_stream_end": s["pending_at_stream_end"],
        "unexecuted_at_end": s["after"]["pending_deletions"],
        "drain_s": s["drain_s"],
        "stream_s": s["stream_s"],
        "latency_p90_ms": _pct(lat, 90),
        "latency_max_ms": float(lat.max()) if len(lat) else None,
        "waited_fraction": answered.get("waited", 0) / n if n else None,
        "wait_baseline_ms": base,
        "gateway_latency_mean_ms": float(server.mean()) if len(server) else None,
        # where a prediction's time goes (means per prediction, ms, both replicas): inside
        # the gateway (fresh view, shard queries, waits for unlearning, the rest: answer,
        # receipts, journal, event-loop turns), and outside it (client, HTTP proxy, Serve's
        # queue to a replica) = client-side mean minus the gateway's own mean
        "latency_breakdown_ms": {
            "client_side": float(lat.mean()) if len(lat) else None,
            "outside_gateway": float(lat.mean() - server.mean()) if len(server) else None,
            "in_gateway": parts["predict_s"],
            "fresh_view": parts["fresh_view_s"],
            "shard_query": parts["query_s"],
            "wait_for_unlearning": parts["wait_s"],
            "gateway_rest": parts["predict_s"]
            - parts["fresh_view_s"]
            - parts["query_s"]
            - parts["wait_s"],
            "recomputes_per_predict": td["recomputes"] / npred,
            "shard_calls_per_predict": td.get("shard_calls", 0) / npred,
        },
        # the fence's own cost, both replicas (stream + drain)
        "fence": {
            "refreshes": td["refreshes"],
            "read_ms_mean": td["read_s"] / refreshes * 1000,
            "read_ms_max": a["timing"].get("read_max_s", 0.0) * 1000,
            "predicts_finding_view_expired": td.get("expired_views"),
            "publishes": td["publishes"],
            "publish_ms_mean": td["publish_s"] / publishes * 1000,
            "journal_flush_ms_mean": td["journal_flush_s"] / refreshes * 1000,
            "loop_lag_ms_mean": td["loop_lag_s"] / refreshes * 1000,
            "loop_lag_ms_max": a["timing"]["loop_lag_max_s"] * 1000,
        },
        "stats_replicas": [b["stats_replicas"], a["stats_replicas"]],
        "cpu": s["cpu"],
        "loadavg_1m": s["loadavg_1m"],
        "warmup_s": s["warmup_s"],
    }


def train_template(root: Path, epochs: int, hidden: list[int]):
    """Train the benchmark's run once; every (policy, rate) serves a private copy of it (the
    same seed would give every policy the same models anyway)."""
    cfg = load_config(
        REPO / "configs/digits.yaml",
        [
            f"storage={root}",
            "name=serve",
            f"seed={SEED}",
            f"training.epochs={epochs}",
            f"model.hidden={hidden}".replace(" ", ""),
            *OVERRIDES,
        ],
    )
    ctx = create_run(cfg)
    return ctx, train_all_shards(ctx)["train_seconds"]


def run_policy(name: str, rate: float, p: dict, root: Path, port: int, token: str, template):
    t0 = time.perf_counter()
    tctx, train_s = template
    dest = root / f"{name}-{rate:g}"
    shutil.copytree(tctx.storage.local_path(""), dest)
    ctx = open_run(str(dest), tctx.run_id)
    test = ctx.split_records("test")
    test_x = np.asarray(test.features, dtype=np.float32).reshape(len(test.labels), -1)
    test_y = np.asarray(test.labels)
    warm = warmup_owners(ctx, SEED)
    pool = [o for o in pick_owners(ctx, 10_000, seed=SEED) if o not in set(warm)]
    policy_spec = {"preset": name, "deadline_s": p["deadline_s"]}
    policy = get_policy(policy_spec)

    t1 = time.perf_counter()
    serve.run(
        build_app(
            {
                "storage": ctx.storage.uri,
                "run_id": ctx.run_id,
                "policy": policy_spec,
                "num_replicas": p["replicas"],
                **p["gateway_args"],
            }
        ),
        name=APP,
        route_prefix="/",
    )
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=60) as c:
        for _ in range(240):
            try:
                r = c.get("/healthz")
                if r.status_code == 200:
                    health = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("gateway never became healthy")
    deploy_s = time.perf_counter() - t1
    print(
        f"[{name} @ {rate:g}/s] run {ctx.run_id}: trained in {train_s:.1f} s, app up in "
        f"{deploy_s:.1f} s",
        flush=True,
    )
    t2 = time.perf_counter()
    ex = None
    for _ in range(240):
        try:
            ex = ray.get_actor(executor_actor_name(ctx.run_id), namespace=NAMESPACE)
            break
        except ValueError:
            time.sleep(0.5)
    if ex is None:
        raise RuntimeError("the gateway never started the executor")
    executor = ray.get(ex.ping.remote(), timeout=300)
    executor_s = time.perf_counter() - t2
    print(f"[{name} @ {rate:g}/s] executor ready in {executor_s:.1f} s", flush=True)
    s = None
    try:
        s = asyncio.run(
            run_stream(
                base,
                token,
                test_x,
                test_y,
                {"warmup": warm, "stream": pool},
                p,
                rate,
                policy,
                ctx,
            )  # fmt: skip
        )
    finally:
        serve.delete(APP)  # the replicas flush their journals and deregister
        time.sleep(0.5)
        if s is not None:
            # evidence from outside the gateway: its journals replayed against the
            # manifests and the log's acknowledgement times
            journal = read_journal(ctx.storage, ctx.layout)
            s["replay"] = replay(ctx, journal)
            s["replay"]["replicas"] = len({e.get("replica") for e in journal})
            s["acks"] = _ack_records(ctx)
        try:
            ray.kill(ray.get_actor(executor_actor_name(ctx.run_id), namespace=NAMESPACE))
        except ValueError:
            pass
        _wait_cpus_free()
        shutil.rmtree(dest, ignore_errors=True)
    rec = metrics(name, rate, s, rejects=policy.uncertified == "reject")
    rec.update(
        policy_effective=health["policy"],
        is_baseline=name in BASELINES,
        timing=policy.timing,
        uncertified=policy.uncertified,
        deadline_s=policy.deadline_s,
        run_id=ctx.run_id,
        train_s=train_s,
        deploy_s=deploy_s,
        executor_ready_s=executor_s,
        executor=executor,
        total_s=time.perf_counter() - t0,
    )
    return rec, np.array([x[1] for x in s["preds"] if 200 <= x[2] < 300]) * 1000


def _ack_records(ctx) -> dict[str, Any]:
    """The fence's side of the acknowledgements, from the run's ack records: how long each
    waited for the gateway replicas after its request was durable, and how they were fenced
    (``expired``: a replica did not publish a newer view within its lease)."""
    waits, how = [], {"confirmed": 0, "expired": 0, "deregistered": 0, "dead": 0}
    folder = f"{ctx.layout.root}/deletions/acks"
    for name in ctx.storage.listdir(folder):
        doc = fence.read_ack(ctx.storage, ctx.layout, name.removesuffix(".json"))
        if doc is None or not str(doc.get("request_id", "")).startswith("bench-"):
            continue  # warm-up deletions are not part of the stream
        waits.append((doc["acknowledged_at"] - doc["written_at"]) * 1000)
        for k in how:
            how[k] += len(doc.get(k) or [])
    a = np.array(waits)
    return {"fence_wait_ms_p50": _pct(a, 50), "fence_wait_ms_p99": _pct(a, 99),
            "fence_wait_ms_max": float(a.max()) if len(a) else None,
            "replicas_by_outcome": how}  # fmt: skip


def _wait_cpus_free(timeout: float = 60.0) -> None:
    """After deleting the app and killing the executor, wait until their CPUs are released."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        total = ray.cluster_resources().get("CPU", 0)
        if ray.available_resources().get("CPU", 0) >= total - 1e-6:
            return
        time.sleep(0.5)


# -- report ----------------------------------------------------------------------------------


def summarize(records: list[dict], rates: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rate in rates:
        rs = {r["policy"]: r for r in records if r["rate"] == rate and "error" not in r}
        obl = rs.get("inference-oblivion")
        ok = [
            r
            for r in rs.values()
            if not r["is_baseline"]
            and r["exposure"] == 0
            and r["dropped"] == 0
            and r["rejected"] == 0
            and r["latency_mean_ms"] is not None
        ]
        s: dict[str, Any] = {
            "oblivion_latency_mean_ms": obl["latency_mean_ms"] if obl else None,
            "oblivion_unlearning_compute_s": obl["unlearning_compute_s"] if obl else None,
        }

        def red(r, key, obl=obl):
            if not obl or not obl[key]:
                return None
            return 1 - r[key] / obl[key]

        for r in ok:
            r_lat, r_cmp = red(r, "latency_mean_ms"), red(r, "unlearning_compute_s")
            r["_red"] = (r_lat, r_cmp)
        if ok:
            best = min(ok, key=lambda r: r["latency_mean_ms"])
            lat_red, cmp_red = best["_red"]
            s.update(
                best_certified_preset=best["policy"],
                best_latency_mean_ms=best["latency_mean_ms"],
                best_unlearning_compute_s=best["unlearning_compute_s"],
                latency_reduction=lat_red,
                compute_reduction=cmp_red,
                latency_target_met=lat_red is not None and lat_red >= 0.9,
                compute_target_met=cmp_red is not None and cmp_red >= 0.3,
            )
        s["presets_meeting_both_targets"] = sorted(
            r["policy"]
            for r in ok
            if r["_red"][0] is not None
            and r["_red"][1] is not None
            and r["_red"][0] >= 0.9
            and r["_red"][1] >= 0.3
        )
        s["reductions_vs_oblivion"] = {
            r["policy"]: {"latency": r["_red"][0], "compute": r["_red"][1]} for r in ok
        }
        for r in ok:
            del r["_red"]
        s["exposure_by_policy"] = {k: r["exposure"] for k, r in rs.items()}
        s["exposure_zero_except_naive"] = all(
            r["exposure"] == 0 for k, r in rs.items() if k != "naive-postponed"
        )
        s["violations_by_policy"] = {k: r["violations"] for k, r in rs.items()}
        s["zero_violations_every_safe_preset"] = all(
            r["violations"] == 0 for r in rs.values() if not r["is_baseline"]
        )
        naive = rs.get("naive-postponed")
        s["naive_postponed_exposes"] = bool(naive and naive["exposure"] > 0)
        s["dropped_total"] = sum(r["dropped"] for r in rs.values())
        s["swaps_total"] = sum(r["swaps"] for r in rs.values())
        s["no_request_dropped"] = s["dropped_total"] == 0
        s["all_deletions_executed"] = all(r["unexecuted_at_end"] == 0 for r in rs.values())
        out[f"{rate:g}"] = s
    return out


def plot(lats: dict[tuple[str, float], np.ndarray], rates: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, len(rates), figsize=(7.5 * len(rates), 5.5), squeeze=False)
    names = list(PRESETS)
    cmap = plt.get_cmap("tab10")
    for ax, rate in zip(axes[0], rates, strict=True):
        for i, name in enumerate(names):
            a = lats.get((name, rate))
            if a is None or not len(a):
                continue
            a = np.sort(a)
            y = np.arange(1, len(a) + 1) / len(a)
            style = {"inference-oblivion": ("k", "--"), "naive-postponed": ("grey", ":")}
            color, ls = style.get(name, (cmap(i % 10), "-"))
            ax.step(a, y, where="post", color=color, ls=ls, lw=1.6, label=name)
        ax.set(
            xscale="log",
            xlabel="prediction latency (ms, client side, log)",
            ylabel="fraction of predictions",
            title=f"deletions: Poisson, {rate:g}/s" if rate > 0 else "no deletions",
            ylim=(0, 1.01),
        )
        # plain milliseconds at 1-2-5 steps; unlabelled minor ticks (their 10^x labels
        # overlapped)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle("ray-unlearn serving: latency CDF per policy (digits, 8 shards x 4 slices, vote)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(records: list[dict], summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    t = Table(title="serving under deletions (client-side latency; violations by replay)")
    cols = ["policy", "del/s", "mean ms", "p50 ms", "p99 ms", "wait ms", "compute s", "exec",
            "swaps", "violations", "answers", "ack p50 ms", "acc", "cert", "dropped",
            "rejected"]  # fmt: skip
    for c in cols:
        t.add_column(c, justify="left" if c == "policy" else "right")
    for r in records:
        if "error" in r:
            t.add_row(r["policy"], f"{r['rate']:g}", "error: " + r["error"][:60])
            continue
        t.add_row(
            r["policy"],
            f"{r['rate']:g}",
            f(r["latency_mean_ms"], ".1f"),
            f(r["latency_p50_ms"], ".1f"),
            f(r["latency_p99_ms"], ".0f"),
            f(r["mean_wait_ms"], ".1f"),
            f(r["unlearning_compute_s"], ".2f"),
            str(r["executions"]),
            str(r["swaps"]),
            str(r["violations"]),
            str(r["answers"]),
            f(r["ack_ms_p50"], ".0f"),
            f(r["accuracy"], ".3f"),
            f(r["certified_fraction"], ".3f"),
            str(r["dropped"]),
            str(r["rejected"]),
        )
    c = Console(width=160)
    c.print(t)
    for rate, s in summary.items():
        lr, cr = s.get("latency_reduction"), s.get("compute_reduction")
        c.print(
            f"[bold]{rate} deletions/s[/bold]: best certified preset "
            f"{s.get('best_certified_preset')}: latency -{f(lr and 100 * lr, '.1f')}% "
            f"(target 90%: {s.get('latency_target_met')}), compute -{f(cr and 100 * cr, '.1f')}% "
            f"(target 30%: {s.get('compute_target_met')}); both targets: "
            f"{s['presets_meeting_both_targets']}; exposure 0 except naive: "
            f"{s['exposure_zero_except_naive']} (naive exposes: {s['naive_postponed_exposes']}); "
            f"dropped {s['dropped_total']} across {s['swaps_total']} swaps"
        )


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
    except Exception:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/serving"))
    ap.add_argument("--quick", action="store_true", help="20 s of stream, 1 deletion rate")
    ap.add_argument("--policies", help="comma-separated subset of presets (development only)")
    ap.add_argument("--epochs", type=int, help="training.epochs of the served run (full: 160)")
    ap.add_argument("--rates", help="comma-separated deletion rates (default: the mode's)")
    ap.add_argument(
        "--gateway-args",
        type=json.loads,
        default={},
        help="JSON of extra gateway settings, e.g. '{\"lease_s\": 60}' (measurement only)",
    )
    args = ap.parse_args()
    p = dict(QUICK if args.quick else FULL)
    p["gateway_args"] = args.gateway_args
    if args.epochs:
        p["epochs"] = args.epochs
    if args.rates:
        p["rates"] = [float(r) for r in args.rates.split(",")]
    names = list(PRESETS)
    if args.quick:  # one safe preset (lazy, wait) and the baseline the replay must catch
        safe = [n for n in names if not PRESETS[n].is_baseline]
        lazy_wait = [
            n for n in safe if PRESETS[n].timing == "lazy" and PRESETS[n].uncertified == "wait"
        ]
        names = [(lazy_wait or safe)[-1], "naive-postponed"]
    if args.policies:
        names = [n.strip() for n in args.policies.split(",")]
        for n in names:
            get_policy(n)
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="ru-serving-"))
    token = secrets.token_urlsafe(24)
    os.environ[TOKEN_ENV] = token  # before ray.init: the replicas inherit it
    torch.set_num_threads(2)

    settings = {
        "quick": args.quick,
        **p,
        "seed": SEED,
        "config": "configs/digits.yaml",
        "overrides": OVERRIDES,
        "policies": names,
        "prediction_batch": 1,
        "record_layout": "one record per (policy, rate); 'rate' = deletions per second",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    doc: dict[str, Any] = {
        "benchmark": "serving",
        "settings": settings,
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "platform": platform.platform(),
            "ray_unlearn_path": str(Path(ray_unlearn.__file__).parent),
            "ray_unlearn_commit": _git_commit(),
        },
        "records": [],
        "summary": {},
    }
    out_json = args.out / "serving.json"
    lats: dict[tuple[str, float], np.ndarray] = {}
    t_start = time.perf_counter()
    port = free_port()
    try:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            namespace=NAMESPACE,
            log_to_driver=False,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        template = train_template(root / "template", p["epochs"], p["hidden"])
        settings["template_train_s"] = template[1]
        print(f"trained the template run {template[0].run_id} in {template[1]:.1f} s", flush=True)
        for rate in p["rates"]:
            for name in names:
                print(f"[{name} @ {rate:g}/s] ...", flush=True)
                try:
                    rec, lat = run_policy(name, rate, p, root, port, token, template)
                    lats[(name, rate)] = lat
                except Exception as e:
                    traceback.print_exc()
                    rec = {"policy": name, "rate": rate, "error": f"{type(e).__name__}: {e}"}
                    try:
                        serve.delete(APP)
                    except Exception:
                        pass
                doc["records"].append(rec)
                if "error" not in rec:
                    print(
                        f"[{name} @ {rate:g}/s] mean {rec['latency_mean_ms']:.1f} ms, p99 "
                        f"{rec['latency_p99_ms']:.0f} ms, compute {rec['unlearning_compute_s']:.2f}"
                        f" s, exposure {rec['exposure']}, cert {rec['certified_fraction']:.3f}, "
                        f"{rec['n_predictions']} preds / {rec['n_deletions']} dels, dropped "
                        f"{rec['dropped']}, {rec['total_s']:.0f} s in all",
                        flush=True,
                    )
                doc["summary"] = summarize(doc["records"], p["rates"])
                out_json.write_text(json.dumps(doc, indent=2))
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(root, ignore_errors=True)
    doc["seconds"] = time.perf_counter() - t_start
    doc["summary"] = summarize(doc["records"], p["rates"])
    out_json.write_text(json.dumps(doc, indent=2))
    plot(lats, p["rates"], args.out / "serving.png")
    table(doc["records"], doc["summary"])
    print(f"wrote {out_json} and {args.out / 'serving.png'} in {doc['seconds']:.0f} s")


if __name__ == "__main__":
    main()
