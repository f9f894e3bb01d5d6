"""The SISA training job: a Ray Train run in which worker w trains the shards k with
k % W == w, slice by slice, and reports one checkpoint per slice round.

Each round's checkpoint holds ``shard_<k>/`` for every shard (Ray Train merges the workers'
folders). Train's checkpoints are transport only: once the run ends, the driver copies each
shard's snapshots into the platform's model store (versions with manifests, the record)
and deletes Train's copies, which would otherwise keep deleted data alive.
"""

from __future__ import annotations

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

from ray_unlearn.platform.core.models import in_module
from ray_unlearn.platform.core.run import RunContext, open_run
from ray_unlearn.platform.core.training import configure_threads, train_run_shard
from ray_unlearn.platform.core.versions import Registry, ShardEntry
from ray_unlearn.platform.methods.hybrid.recording import recording_hook


def worker_layout(num_shards: int, num_workers: int, cluster_cpus: float, cpus_per_worker: float):
    """(workers, CPUs per worker) for a cluster of ``cluster_cpus``.

    Workers get a fraction of a CPU when there are more workers than CPUs, so that no
    worker waits for a CPU another one holds (see RAY_NOTES: CPU starvation). Torch threads
    are not chosen here: the run pins them (``training.torch_threads``) for exactness.
    """
    workers = num_workers or num_shards
    cpus = cpus_per_worker or max(0.01, math.floor(min(1.0, cluster_cpus / workers) * 100) / 100)
    return workers, cpus


def _train_loop(config: dict[str, Any]) -> None:
    ctx = open_run(config["storage"], config["run_id"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    configure_threads(config["threads"])
    cfg = ctx.config
    mine = [k for k in range(cfg.partition.shards) if k % world == rank]
    # the SISA driver, one per shard: this worker only interleaves their stages so that it
    # reports once per slice round. hybrid.record: the hook writes each stage's contributions
    # beside the version it belongs to (ids are deterministic: generation 0)
    runs = {k: train_run_shard(ctx, k, hook=recording_hook(ctx, k)) for k in mine}
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
                    f"[ray-unlearn] shard {k}: slice {stage + 1}/{cfg.partition.slices} "
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
    t0 = time.perf_counter()
    s3t = ctx.config.unlearning.strategy == "s3t"
    if s3t:  # the backbone first, once, on the driver: the workers only add adapters
        from ray_unlearn.platform.methods.s3t.runtime import pretrain_and_save_backbone

        pretrain_and_save_backbone(ctx, created_by="train-job")
    trainer = TorchTrainer(
        _s3t_loop if s3t else _train_loop,
        train_loop_config={"storage": ctx.storage.uri, "run_id": ctx.run_id, "threads": threads},
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=False, resources_per_worker={"CPU": cpus}
        ),
        run_config=ray.train.RunConfig(
            name="sisa",
            storage_path=ctx.storage.full(ctx.layout.train_transport),
            storage_filesystem=ctx.storage.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(
            f"training job of run {ctx.run_id} failed: {result.error}"
        ) from result.error
    train_seconds = time.perf_counter() - t0
    ingest_seconds = _ingest_s3t(ctx, result) if s3t else _ingest(ctx, result)
    return {
        "run_id": ctx.run_id,
        "workers": workers,
        "cpus_per_worker": cpus,
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


# -- S3T --------------------------------------------------------------------------------------
def _s3t_loop(config: dict[str, Any]) -> None:
    """Worker w trains every order of its shards on the frozen backbone, stage round by
    stage round: in round i it trains stage i of each (shard, order) and reports one
    checkpoint holding ``shard_<k>/o<b>/`` with those stage-i snapshots. (Orders are
    independent, so interleaving them gives the results of training each in one go.)"""
    from ray_unlearn.platform.methods.s3t.orders import select_orders
    from ray_unlearn.platform.methods.s3t.runtime import (
        BACKBONE,
        load_backbone,
        public_sample_ids,
        s3t_config,
    )
    from ray_unlearn.platform.methods.s3t.training import iter_order_stages

    ctx = open_run(config["storage"], config["run_id"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    configure_threads(config["threads"])
    cfg, s3t = ctx.config, s3t_config(ctx)
    blocks = ctx.model_store.manifest(BACKBONE)["blocks"]
    orders = select_orders(s3t.selection, len(blocks), s3t.budget, s3t.deletion_prior)
    public = set(public_sample_ids(ctx).tolist())
    mine = [k for k in range(cfg.partition.shards) if k % world == rank]
    backbone = load_backbone(ctx)
    runs = {
        (k, b): iter_order_stages(backbone, data, order, b, s3t, seed=cfg.seed, blocks=blocks)
        for k in mine
        for data in [ctx.shard_data(k, exclude=public)]
        for b, order in enumerate(orders)
    }
    for stage in range(1, len(blocks) + 1):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            for (k, b), run in runs.items():
                st, _ = next(run)
                out = Path(d) / f"shard_{k}" / f"o{b}"
                out.mkdir(parents=True)
                save_file(st.tensors(), str(out / "weights.safetensors"))
                pq.write_table(pa.table({"sample_id": st.sample_ids}), out / "samples.parquet")
                (out / "meta.json").write_text(
                    json.dumps(
                        {
                            "order_index": st.order_index,
                            "order": list(st.order),
                            "stage": st.stage,
                            "block": st.block,
                            "adapter": st.adapter,
                            "lora_rank": st.lora_rank,
                            "lora_alpha": st.lora_alpha,
                            "metrics": st.metrics,
                        }
                    )
                )
            print(
                f"[ray-unlearn] s3t stage {stage}/{len(blocks)} of shards {mine} "
                f"({len(orders)} orders each) in {time.perf_counter() - t0:.1f}s",
                file=sys.stderr,
                flush=True,
            )
            ray.train.report({"stage": stage - 1}, checkpoint=Checkpoint.from_directory(d))


def _ingest_s3t(ctx: RunContext, result) -> float:
    from ray_unlearn.platform.methods.s3t.runtime import BACKBONE, fresh_entry, save_stage
    from ray_unlearn.platform.methods.s3t.training import S3TStage

    head = ctx.config.model.parts.head  # the head's parameters are "<head>.*"
    t0 = time.perf_counter()
    versions: dict[int, dict[str, str]] = {k: {} for k in range(ctx.config.partition.shards)}
    orders: dict[int, dict[int, list[int]]] = {k: {} for k in versions}
    for ckpt, _ in sorted(result.best_checkpoints, key=lambda cm: cm[1]["stage"]):
        with ckpt.as_directory() as d:
            for k in versions:
                for odir in sorted((Path(d) / f"shard_{k}").iterdir()):
                    m = json.loads((odir / "meta.json").read_text())
                    state = load_file(str(odir / "weights.safetensors"))
                    st = S3TStage(
                        m["order_index"],
                        tuple(m["order"]),
                        m["stage"],
                        m["block"],
                        m["adapter"],
                        m["lora_rank"],
                        m["lora_alpha"],
                        {n: v for n, v in state.items() if not in_module(n, head)},
                        {n: v for n, v in state.items() if in_module(n, head)},
                        pq.read_table(odir / "samples.parquet")["sample_id"].to_numpy(),
                        m["metrics"],
                    )
                    parent = versions[k].get(f"{st.order_index}/{st.stage - 1}", BACKBONE)
                    versions[k][f"{st.order_index}/{st.stage}"] = save_stage(
                        ctx, k, st, 0, parent, "train-job"
                    )
                    orders[k][st.order_index] = list(st.order)
    reg = Registry(
        {k: fresh_entry([orders[k][b] for b in sorted(orders[k])], v) for k, v in versions.items()},
        shared=[BACKBONE],
    )
    ctx.model_store.write_registry(reg)
    ctx.storage.delete(ctx.layout.train_transport)
    return time.perf_counter() - t0
