"""Connecting to Ray: an existing cluster when an address is given, else an embedded one."""

from __future__ import annotations

import os

import ray

NAMESPACE = "ray_unlearn"
_dashboard: list[str] = []  # the embedded Ray's dashboard URL, once started with one


def connect(
    address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False
) -> bool:
    """Initialise Ray once; returns True when attached to an existing cluster.

    ``address`` (or ``RAY_ADDRESS``) attaches to a running cluster, where the unlearning
    executor is a detached actor shared by every client. Without one, Ray starts embedded
    in this process and everything ends with it; ``dashboard`` then starts Ray's dashboard
    (and its REST API, which ``serve status`` and ``serve deploy`` use) on 127.0.0.1 only.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return bool(address)
    if address:
        ray.init(address=address, namespace=NAMESPACE)
        return True
    info = ray.init(
        namespace=NAMESPACE,
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",  # never 0.0.0.0: the job API runs code on the cluster
    )
    if dashboard and info.dashboard_url:
        url = info.dashboard_url
        _dashboard[:] = [url if "://" in url else f"http://{url}"]
    return False


def dashboard_url() -> str | None:
    """The embedded Ray's dashboard (``http://127.0.0.1:<port>``), or None: none started, or
    attached to a cluster (whose dashboard address the user already has)."""
    return _dashboard[0] if _dashboard else None
