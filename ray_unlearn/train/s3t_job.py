"""S3T's Ray Train job (the registry's ``ray_train_job`` of the ``s3t`` method), run by
``ray_unlearn.train.job.run_training``: the driver pre-trains the frozen backbone once
(``prepare``), worker w trains every slice order of the shards k with k % W == w on it
(``loop``), and the driver copies the reported stages into the model store (``ingest``).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray.train
from ray.train import Checkpoint
from safetensors.torch import load_file, save_file

from ray_unlearn.platform.core.models import in_module
from ray_unlearn.platform.core.run import RunContext, open_run
from ray_unlearn.platform.core.training import configure_threads
from ray_unlearn.platform.core.versions import Registry
from ray_unlearn.train.session import declare_worker_gpus


def prepare(ctx: RunContext) -> None:
    """The backbone first, once, on the driver: the workers only add adapters."""
    from ray_unlearn.platform.methods.s3t.runtime import pretrain_and_save_backbone

    pretrain_and_save_backbone(ctx, created_by="train-job")


def loop(config: dict[str, Any]) -> None:
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
        training_device,
    )
    from ray_unlearn.platform.methods.s3t.training import iter_order_stages

    declare_worker_gpus()  # training.device auto: CUDA only on a granted GPU
    ctx = open_run(config["storage"], config["run_id"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    configure_threads(config["threads"])
    cfg, s3t = ctx.config, s3t_config(ctx)
    blocks = ctx.model_store.manifest(BACKBONE)["blocks"]
    R = ctx.plan.num_slices  # stages per order (blocks are grouped over them)
    orders = select_orders(s3t.selection, R, s3t.budget, s3t.deletion_prior)
    public = set(public_sample_ids(ctx).tolist())
    mine = [k for k in range(cfg.partition.shards) if k % world == rank]
    # the orders train where training.device resolves on this worker (a granted GPU, set up
    # for deterministic kernels); snapshots come back as CPU tensors
    backbone = load_backbone(ctx, device=training_device(ctx))
    runs = {
        (k, b): iter_order_stages(backbone, data, order, b, s3t, seed=cfg.seed, blocks=blocks)
        for k in mine
        for data in [ctx.shard_data(k, exclude=public)]
        for b, order in enumerate(orders)
    }
    for stage in range(1, R + 1):
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
                            "targets": st.wrapped(),
                            "adapter": st.adapter,
                            "lora_rank": st.lora_rank,
                            "lora_alpha": st.lora_alpha,
                            "metrics": st.metrics,
                        }
                    )
                )
            print(
                f"[ray-unlearn] s3t stage {stage}/{R} of shards {mine} "
                f"({len(orders)} orders each) in {time.perf_counter() - t0:.1f}s",
                file=sys.stderr,
                flush=True,
            )
            ray.train.report({"stage": stage - 1}, checkpoint=Checkpoint.from_directory(d))


def ingest(ctx: RunContext, result) -> float:
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
                        tuple(m.get("targets") or ()),
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
