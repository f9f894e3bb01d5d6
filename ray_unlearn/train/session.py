"""Connecting to Ray: an existing cluster when an address is given, else an embedded one."""

from __future__ import annotations

import os

import ray

NAMESPACE = "ray_unlearn"
_dashboard: list[str] = []  # the embedded Ray's dashboard URL, once started with one


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
    in this process and everything ends with it, with Ray's dashboard (and its REST API,
    which ``serve status`` and ``serve deploy`` use) on 127.0.0.1 only: :func:`embedded_options`.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return bool(address)
    if address:
        ray.init(address=address, namespace=NAMESPACE)
        return True
    info = ray.init(namespace=NAMESPACE, num_cpus=num_cpus, **embedded_options())
    url = info.dashboard_url
    if url:
        _dashboard[:] = [url if "://" in url else f"http://{url}"]
    return False


def dashboard_url() -> str | None:
    """The embedded Ray's dashboard (``http://127.0.0.1:<port>``), or None: none started, or
    attached to a cluster (whose dashboard address the user already has)."""
    return _dashboard[0] if _dashboard else None


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
