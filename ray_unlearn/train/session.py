"""Connecting to Ray: an existing cluster when an address is given, else an embedded one."""

from __future__ import annotations

import os

import ray

NAMESPACE = "ray_unlearn"


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
    ray.init(namespace=NAMESPACE, num_cpus=num_cpus, **embedded_options())
    return False


def embedded_options() -> dict:
    """``ray.init`` options of an embedded Ray that keep Ray Train quiet for a good reason.

    Ray Train's PlacementGroupCleaner polls the State API (served by the dashboard process)
    for the train controller's liveness. Without a dashboard every poll failed and logged
    "Failed to query Ray Train Controller actor state" (most lines of ``make demo``); and
    a worker finds the API server by guessing the cluster, which fails as soon as another
    Ray runs on the machine ("Found multiple active Ray instances"). So the dashboard runs,
    on 127.0.0.1 only, at a port chosen here, and every worker is told its URL.

    A single-node embedded Ray has no node drains to watch, so Ray Train's preemption
    watcher (whose actor logs an error-level line about its restart arguments) is off."""
    port = _free_port()
    return {
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": port,
        "runtime_env": {
            "env_vars": {
                "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                # Ray Train's print patch tees a worker's print to stderr *and* its logger,
                # and both reach the driver: every progress line came twice
                "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            }
        },
    }


def _free_port(preferred: int = 8265) -> int:
    """Ray's usual dashboard port (what `ray` and `serve` commands try first) when it is
    free, else any free port."""
    import socket

    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1 for Ray's dashboard")
