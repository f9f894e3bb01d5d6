"""Building the Serve application: one ``ShardModel`` deployment per shard + the gateway.

``build_app`` is the import path ``serve run`` / ``serve deploy`` use (configs/serve.yaml);
``ray-unlearn serve`` calls it too.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from ray_unlearn.platform.core.run import open_run
from ray_unlearn.platform.serving.policies import get_policy
from ray_unlearn.serve.gateway import Gateway, GatewaySettings
from ray_unlearn.serve.shard import ShardModel


def shard_actor_options(cpus: float, gpus: float) -> dict[str, float]:
    """A shard replica's ``ray_actor_options``: ``gpus`` (serving.gpus_per_replica; a fraction
    shares a GPU) only when above 0, so a CPU deployment asks Ray for no GPU. The gateway
    computes no model and never takes a GPU."""
    if isinstance(gpus, bool) or not isinstance(gpus, int | float) or gpus < 0:
        raise ValueError(
            f"shard_gpus (serving.gpus_per_replica) must be a number >= 0, got {gpus!r}"
        )
    return {"num_cpus": cpus, "num_gpus": float(gpus)} if gpus > 0 else {"num_cpus": cpus}


def build_app(args: dict[str, Any]) -> Application:
    """``args``: the fields of :class:`GatewaySettings` (storage, run_id, policy, ...), plus
    optional ``shard_cpus`` (CPUs reserved per shard replica, default 0.1), ``shard_gpus``
    (GPUs per shard replica, default the run's ``serving.gpus_per_replica``) and
    ``num_replicas`` (gateway replicas, default 1: each fences itself through the storage
    root, so any number is safe)."""
    args = dict(args)
    shard_cpus = float(args.pop("shard_cpus", 0.1))
    shard_gpus = args.pop("shard_gpus", None)
    num_replicas = args.pop("num_replicas", 1)
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
    settings = GatewaySettings(**args)
    get_policy(settings.policy)  # fail here, with the list of presets, not in a replica
    ctx = open_run(settings.storage, settings.run_id)
    shards = sorted(ctx.model_store.registry().shards)
    if not shards:
        raise ValueError(
            f"run {settings.run_id} has no trained shards: run `ray-unlearn train` first"
        )
    gpus = ctx.config.serving.gpus_per_replica if shard_gpus is None else shard_gpus
    opts = shard_actor_options(shard_cpus, gpus)
    handles = [
        ShardModel.options(name=f"shard_{k}", ray_actor_options=opts).bind(
            ctx.storage.uri, settings.run_id, k
        )
        for k in shards
    ]
    return Gateway.options(name="gateway", num_replicas=num_replicas).bind(
        settings.model_dump() | {"storage": ctx.storage.uri}, *handles
    )
