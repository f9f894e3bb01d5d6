"""Which OpenMP wait policy suits this node? One SISA stage under each policy, alone and
beside one busy process.

Run:  .venv/bin/python benchmarks/omp_wait_policy.py --out results/omp_wait_policy [--quick]

torch's CPU kernels run on OpenMP (libgomp) threads. At the end of every parallel region an
idle thread either spins for a while (libgomp's default; ``ACTIVE``: spins always) or sleeps
at once (``PASSIVE``, what ray-unlearn gives its shard actors, Train workers, Tune trials
and Serve replicas unless the environment sets a policy). Spinning wins when the training
process has its cores to itself; it loses badly when another busy process needs one of
them (the spinning thread burns the core its partner waits for). This script measures both
sides on the node it runs on, so that a team can choose ``OMP_WAIT_POLICY`` for its nodes.

For each policy (``PASSIVE``, ``default`` = unset, ``ACTIVE``) x torch threads (1, 2) x
condition (``alone``; ``beside_busy``: one other process spinning a core at the same
niceness), a fresh interpreter (libgomp reads the policy when it loads) trains the same
work: the last stage (slice R-1) of shard 0 of the purchase-shaped run (configs/purchase.yaml,
K=8, R=5, 100k samples, 30 epochs; ``--quick``: 20k samples, 5 epochs), from fixed weights,
with ``train_shard`` (the code the executor's shard actors run), ``--reps`` times after
one untimed warm-up.

Writes <out>/omp_wait_policy.json: per configuration ``wall_s`` (median), ``walls_s``,
``cpu_s`` (median CPU seconds of the process), ``ratio_to_passive`` (its wall over PASSIVE's
at the same threads and condition) and ``weights_sha256`` of the trained stage (the policy
decides when threads sleep, not how work is split: equal for equal threads); plus ``machine``
(CPUs, load before). And <out>/omp_wait_policy.png: wall time per configuration, alone and
beside a busy process. Nothing here is a test; figures are this node's, now.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("PASSIVE", "default", "ACTIVE")
THREADS = (1, 2)
CONDITIONS = ("alone", "beside_busy")


def make_run(storage: Path, n_samples: int, epochs: int) -> str:
    from ray_unlearn.platform.core.config import load_config
    from ray_unlearn.platform.core.run import create_run

    cfg = load_config(
        REPO / "configs/purchase.yaml",
        [
            f"storage={storage}",
            "name=omp-policy",
            "partition.shards=8",
            "partition.slices=5",
            f"data.synthetic.n_samples={n_samples}",
            f"training.epochs={epochs}",
        ],
    )
    return create_run(cfg).run_id


def worker(storage: str, run_id: str, threads: int, reps: int) -> dict:
    """In a fresh interpreter: time the last stage of shard 0, ``reps`` times."""
    import torch

    from ray_unlearn.platform.core.run import open_run
    from ray_unlearn.platform.core.training import init_model, train_shard
    from ray_unlearn.platform.methods.hybrid.updates import state_digest

    ctx = open_run(storage, run_id)
    cfg = ctx.config
    train_cfg = cfg.training.model_copy(update={"torch_threads": threads})
    data = ctx.shard_data(0)
    last = data.num_slices - 1
    start = init_model(cfg.model, ctx.feature_shape, ctx.num_classes, cfg.seed, 0).state_dict()

    def once():
        t0, c0 = time.perf_counter(), time.process_time()
        (stage,) = train_shard(
            data,
            cfg.model,
            train_cfg,
            seed=cfg.seed,
            feature_shape=ctx.feature_shape,
            num_classes=ctx.num_classes,
            start_stage=last,
            start_state=start,
        )
        return time.perf_counter() - t0, time.process_time() - c0, stage.state

    once()  # torch's lazy imports and first allocations, untimed
    walls, cpus = [], []
    for _ in range(reps):
        w, c, state = once()
        walls.append(w)
        cpus.append(c)
    return {
        "wall_s": statistics.median(walls),
        "walls_s": walls,
        "cpu_s": statistics.median(cpus),
        "weights_sha256": state_digest(state),
        "torch_threads": torch.get_num_threads(),
    }


def run_one(storage: Path, run_id: str, policy: str, threads: int, reps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, __file__, "--worker", str(storage), run_id, str(threads), str(reps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CONDITIONS), figsize=(10, 4), sharey=True)
    for ax, cond in zip(axes, CONDITIONS, strict=True):
        rows = [r for r in results if r["condition"] == cond]
        labels = [f"{r['policy']}\n{r['threads']} thr" for r in rows]
        ax.bar(range(len(rows)), [r["wall_s"] for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(cond.replace("_", " "))
        ax.set_yscale("log")
    axes[0].set_ylabel("one SISA stage, wall s (median)")
    fig.suptitle("OpenMP wait policy on this node")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        storage, run_id, threads, reps = sys.argv[2:6]
        print(json.dumps(worker(storage, run_id, int(threads), int(reps))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/omp_wait_policy"))
    ap.add_argument("--quick", action="store_true", help="20k samples, 5 epochs, 2 repetitions")
    ap.add_argument("--reps", type=int, help="timed repetitions per configuration (default 3)")
    args = ap.parse_args()
    n_samples, epochs, reps = (20_000, 5, 2) if args.quick else (100_000, 30, 3)
    reps = args.reps or reps
    args.out.mkdir(parents=True, exist_ok=True)
    storage = Path(tempfile.mkdtemp(prefix="omp-policy-"))
    t_start, load_before = time.time(), os.getloadavg()[0]
    results = []
    try:
        run_id = make_run(storage, n_samples, epochs)
        for cond in CONDITIONS:
            busy = None
            if cond == "beside_busy":
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                for threads in THREADS:
                    for policy in POLICIES:
                        rec = run_one(storage, run_id, policy, threads, reps)
                        rec.update(condition=cond, policy=policy, threads=threads)
                        rec["loadavg_1m"] = os.getloadavg()[0]
                        results.append(rec)
                        print(
                            f"{cond:12s} {policy:8s} {threads} threads: {rec['wall_s']:.2f} s "
                            f"(CPU {rec['cpu_s']:.2f} s; {', '.join(f'{w:.2f}' for w in rec['walls_s'])})",
                            flush=True,
                        )
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    base = {
        (r["condition"], r["threads"]): r["wall_s"] for r in results if r["policy"] == "PASSIVE"
    }
    for r in results:
        r["ratio_to_passive"] = r["wall_s"] / base[(r["condition"], r["threads"])]
    doc = {
        "benchmark": "omp_wait_policy",
        "quick": args.quick,
        "work": {
            "config": "configs/purchase.yaml",
            "shards": 8,
            "slices": 5,
            "n_samples": n_samples,
            "epochs": epochs,
            "stage": "last slice of shard 0",
        },
        "reps": reps,
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_before": load_before},
        "seconds": time.time() - t_start,
        "results": results,
    }
    (args.out / "omp_wait_policy.json").write_text(json.dumps(doc, indent=2))
    plot(results, args.out / "omp_wait_policy.png")
    print(f"wrote {args.out / 'omp_wait_policy.json'} and omp_wait_policy.png")


if __name__ == "__main__":
    main()
