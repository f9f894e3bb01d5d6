"""Connecting to Ray: an existing cluster when an address is given, else an embedded one."""

from __future__ import annotations

import os

import ray

NAMESPACE = "ray_unlearn"


def executor_actor_name(run_id: str) -> str:
    """The name of a run's detached unlearning executor actor (in :data:`NAMESPACE`)."""
    return f"ray-unlearn-executor:{run_id}"


def running_executor(run_id: str):
    """The run's detached executor actor if one is alive on the connected cluster, else
    None. A lookup by name only: it imports nothing of the executor (no torch), so a client
    that attaches to a running executor stays light (``ray-unlearn forget --address``)."""
    try:
        return ray.get_actor(executor_actor_name(run_id), namespace=NAMESPACE)
    except ValueError:  # no actor of that name (never started, or killed)
        return None


def declare_worker_gpus() -> list[str]:
    """Tell the platform which GPUs Ray granted this worker (none when it asked for none),
    so ``training.device: auto`` uses a GPU only where one was reserved. Returns the ids."""
    # here, not at the top: the device module imports torch, which a light client (one
    # attaching to a running executor) never needs
    from ray_unlearn.platform.core.device import declare_ray_gpus

    ids = [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    declare_ray_gpus(ids)
    return ids


def check_cluster_gpus(per_process: float, processes: int, what: str) -> None:
    """Refuse, before anything is scheduled, ``processes`` x ``per_process`` GPUs the cluster
    does not have: Ray would leave the request pending for ever. ``what`` names the setting
    (e.g. resources.gpus_per_worker)."""
    if per_process <= 0:
        return
    have = float(ray.cluster_resources().get("GPU", 0))
    if have <= 0:
        raise ValueError(
            f"{what}={per_process:g} but the Ray cluster has no GPU; set {what}=0 (CPU) or "
            "connect to a cluster with GPUs"
        )
    # every one of them lives at once (Train's workers are gang-scheduled, shard actors and
    # replicas are long-lived), so the total must fit; a fraction shares a GPU
    need = per_process * processes
    if need > have + 1e-9:
        raise ValueError(
            f"{what}={per_process:g} for {processes} process(es) needs {need:g} GPU(s), the "
            f"Ray cluster has {have:g}: lower {what} (fractions share a GPU, e.g. "
            f"{have / processes:.3g}) so that all fit"
        )


def connect(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Initialise Ray once; returns True when attached to an existing cluster.

    ``address`` (or ``RAY_ADDRESS``) attaches to a running cluster, where the unlearning
    executor is a detached actor shared by every client. Without one, Ray starts embedded
    in this process and everything ends with it.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return bool(address)
    if address:
        ray.init(address=address, namespace=NAMESPACE)
        return True
    ray.init(namespace=NAMESPACE, num_cpus=num_cpus, include_dashboard=False)
    return False
