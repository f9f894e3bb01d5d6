"""The SISA training job: a Ray Train run in which worker w trains the shards k with
k % W == w, slice by slice, and reports one checkpoint per slice round.

Each round's checkpoint holds ``shard_<k>/`` for every shard (Ray Train merges the workers'
folders). Train's checkpoints are transport only: once the run ends, the driver copies each
shard's snapshots into the platform's model store (versions with manifests, the record)
and deletes Train's copies, which would otherwise keep deleted data alive.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file

from ray_unlearn.platform.core.run import RunContext, open_run
from ray_unlearn.platform.core.training import configure_threads, train_run_shard
from ray_unlearn.platform.core.versions import Registry, ShardEntry
from ray_unlearn.platform.methods import registry
from ray_unlearn.train.session import check_cluster_gpus, declare_worker_gpus
from ray_unlearn.train.worker_env import torch_runtime_env


def worker_layout(num_shards: int, num_workers: int, cluster_cpus: float, cpus_per_worker: float):
    """(workers, CPUs per worker) for a cluster of ``cluster_cpus``.

    Workers get a fraction of a CPU when there are more workers than CPUs, so that no
    worker waits for a CPU another one holds (see RAY_NOTES: CPU starvation). Torch threads
    are not chosen here: the run pins them (``training.torch_threads``) for exactness.
    """
    workers = num_workers or num_shards
    cpus = cpus_per_worker or max(0.01, math.floor(min(1.0, cluster_cpus / workers) * 100) / 100)
    return workers, cpus


def scaling_options(workers: int, cpus: float, gpus: float) -> dict[str, Any]:
    """``ScalingConfig`` keywords: ``gpus`` (resources.gpus_per_worker) per worker, a fraction
    sharing a GPU; with 0 the workers reserve CPUs only (and ``device: auto`` trains on CPU)."""
    resources: dict[str, float] = {"CPU": cpus}
    if gpus > 0:
        resources["GPU"] = gpus
    return {"num_workers": workers, "use_gpu": gpus > 0, "resources_per_worker": resources}


def check_gpu_request(cfg, *, against_cluster: bool = False) -> None:
    """A run's GPU settings, before the run is created: ``training.device=cuda`` needs GPUs
    granted to the workers, and (``against_cluster``: the connected one) the workers' GPUs
    must fit the cluster. Raises ValueError naming the setting."""
    if cfg.training.device == "cuda" and cfg.resources.gpus_per_worker <= 0:
        raise ValueError(
            "training.device=cuda, but Ray Train workers are given a GPU only with "
            "resources.gpus_per_worker > 0 (e.g. 1, or 0.25 to put four workers on one GPU); "
            "or use training.device=auto"
        )
    if not against_cluster:
        return
    workers, _ = worker_layout(
        cfg.partition.shards, cfg.training.num_workers, 1.0, cfg.training.cpus_per_worker
    )
    check_cluster_gpus(cfg.resources.gpus_per_worker, workers, "resources.gpus_per_worker")


def _train_loop(config: dict[str, Any]) -> None:
    declare_worker_gpus()  # training.device auto: CUDA only on a granted GPU
    ctx = open_run(config["storage"], config["run_id"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    configure_threads(config["threads"])
    cfg = ctx.config
    mine = [k for k in range(cfg.partition.shards) if k % world == rank]
    # the SISA driver, one per shard: this worker only interleaves their stages so that it
    # reports once per slice round. hybrid.record: the hook writes each stage's contributions
    # beside the version it belongs to (ids are deterministic: generation 0)
    runs = {k: train_run_shard(ctx, k, hook=registry.shard_hook(ctx, k)) for k in mine}
    for stage in range(cfg.partition.slices):
        with tempfile.TemporaryDirectory() as d:
            losses = []
            for k in mine:
                st = next(runs[k])
                m = st.metrics
                losses.append(m["loss"])
                out = Path(d) / f"shard_{k}"
                out.mkdir()
                save_file(st.state, str(out / "weights.safetensors"))
                pq.write_table(pa.table({"sample_id": st.sample_ids}), out / "samples.parquet")
                (out / "metrics.json").write_text(json.dumps(m))
                print(
                    f"[ray-unlearn] shard {k}: slice {stage} done "  # numbered from 0
                    f"({stage + 1} of {cfg.partition.slices}) "
                    f"loss={m['loss']:.4f} rows={int(m['train_rows'])} {m['seconds']:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
            # report() is a barrier: every worker reports once per slice round.
            ray.train.report(
                {
                    "stage": stage,
                    "rank0_mean_loss": float(np.mean(losses)) if losses else float("nan"),
                },
                checkpoint=Checkpoint.from_directory(d),
            )


def run_training(ctx: RunContext) -> dict[str, Any]:
    """Train every shard of ``ctx`` on the connected Ray cluster and record the versions."""
    cfg = ctx.config
    cluster_cpus = float(ray.cluster_resources().get("CPU", 1))
    threads = cfg.training.torch_threads
    workers, cpus = worker_layout(
        cfg.partition.shards,
        cfg.training.num_workers,
        cluster_cpus,
        cfg.training.cpus_per_worker,
    )
    gpus = cfg.resources.gpus_per_worker
    check_cluster_gpus(gpus, workers, "resources.gpus_per_worker")
    t0 = time.perf_counter()
    # a run of a method's own kind brings its own job (prepare on the driver, worker loop,
    # ingest into the model store): the registry names its module
    job_module = registry.ray_train_job(cfg)
    job = importlib.import_module(job_module) if job_module else None
    if job is not None:
        job.prepare(ctx)
    trainer = TorchTrainer(
        job.loop if job is not None else _train_loop,
        train_loop_config={"storage": ctx.storage.uri, "run_id": ctx.run_id, "threads": threads},
        scaling_config=ScalingConfig(**scaling_options(workers, cpus, gpus)),
        run_config=ray.train.RunConfig(
            name="sisa",
            storage_path=ctx.storage.full(ctx.layout.train_transport),
            storage_filesystem=ctx.storage.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            # idle OpenMP threads sleep, and torch starts with the run's threads (worker_env)
            worker_runtime_env=torch_runtime_env(threads),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(
            f"training job of run {ctx.run_id} failed: {result.error}"
        ) from result.error
    train_seconds = time.perf_counter() - t0
    ingest_seconds = job.ingest(ctx, result) if job is not None else _ingest(ctx, result)
    return {
        "run_id": ctx.run_id,
        "workers": workers,
        "cpus_per_worker": cpus,
        "gpus_per_worker": gpus,
        "torch_threads": threads,
        "train_seconds": train_seconds,
        "ingest_seconds": ingest_seconds,
    }


def _ingest(ctx: RunContext, result) -> float:
    """Copy every round's shard snapshots into the model store, then drop Train's copies."""
    t0 = time.perf_counter()
    cfg = ctx.config
    rounds = sorted(result.best_checkpoints, key=lambda cm: cm[1]["stage"])
    if [m["stage"] for _, m in rounds] != list(range(cfg.partition.slices)):
        raise RuntimeError(
            f"training job of run {ctx.run_id} reported stages {[m['stage'] for _, m in rounds]}, "
            f"expected 0..{cfg.partition.slices - 1}"
        )
    chains: dict[int, list[str]] = {k: [] for k in range(cfg.partition.shards)}
    for ckpt, metrics in rounds:
        stage = metrics["stage"]
        with ckpt.as_directory() as d:
            for k in range(cfg.partition.shards):
                src = Path(d) / f"shard_{k}"
                if not src.is_dir():
                    raise RuntimeError(
                        f"round {stage} checkpoint lacks shard_{k}/ (found {sorted(p.name for p in Path(d).iterdir())})"
                    )
                m = ctx.model_store.save_version(
                    shard=k,
                    stage=stage,
                    generation=0,
                    state=load_file(str(src / "weights.safetensors")),
                    sample_ids=pq.read_table(src / "samples.parquet")["sample_id"].to_numpy(),
                    parent=chains[k][-1] if chains[k] else None,
                    metrics=json.loads((src / "metrics.json").read_text()),
                    config_digest=ctx.config_digest,
                    created_by="train-job",
                )
                chains[k].append(m["version"])
    ctx.model_store.write_registry(Registry({k: ShardEntry(c, 0) for k, c in chains.items()}))
    ctx.storage.delete(ctx.layout.train_transport)
    return time.perf_counter() - t0
