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
