"""Building the Serve application: one ``ShardModel`` deployment per shard + the gateway.

Two import paths, for Serve's two conventions:

- ``ray_unlearn.serve.app:build_app``, an application builder: a Serve config names it
  with ``args`` (configs/serve.yaml); ``ray-unlearn serve`` calls it too.
- ``ray_unlearn.serve.app:app``, an Application, for ``serve build`` (which accepts only an
  Application, no args) and ``serve run ray_unlearn.serve.app:app``. The run comes from the
  environment: ``RAY_UNLEARN_STORAGE`` (the storage root, absolute or a URI) and
  ``RAY_UNLEARN_RUN`` (the run id), optionally ``RAY_UNLEARN_POLICY``. A deployment re-imports
  the module on the cluster, so the generated config must carry them under
  ``runtime_env: {env_vars: ...}`` (docs/serving.md, "serve build").

A storage root in a Serve config must be absolute (or a URI): Serve builds the application
in a Ray worker whose working directory is neither the config file's nor the shell's, so a
relative path would silently name another directory.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application

from ray_unlearn.platform.core.run import open_run
from ray_unlearn.platform.serving.policies import get_policy
from ray_unlearn.serve.gateway import Gateway, GatewaySettings
from ray_unlearn.serve.shard import ShardModel
from ray_unlearn.train.worker_env import torch_runtime_env

STORAGE_ENV, RUN_ENV, POLICY_ENV = "RAY_UNLEARN_STORAGE", "RAY_UNLEARN_RUN", "RAY_UNLEARN_POLICY"


def check_storage(storage: str, where: str = "storage") -> str:
    """``storage`` if it is a URI or an absolute local path (``~`` expanded); else ValueError
    naming ``where`` and what is allowed."""
    if "://" in storage:
        return storage
    path = os.path.expanduser(storage)
    if not os.path.isabs(path):
        raise ValueError(
            f"{where} {storage!r} is a relative path: a Serve application is built in a Ray "
            "worker whose working directory is not the config file's, so give an absolute "
            "path (e.g. /srv/ray-unlearn/runs) or a URI (s3://bucket/prefix)"
        )
    return path


def replica_runtime_env() -> dict[str, Any]:
    """The replicas' ``runtime_env``: sleeping OpenMP threads (train/worker_env.py) on top of
    the deploying job's runtime_env. ``serve.run`` gives a deployment without a runtime_env
    the job's, but one with its own only the job's working_dir (Serve's build_app), so the
    job's (its pip, py_modules, env_vars) is copied in here. Without a Ray connection
    (``serve build``) there is none to copy: a Serve config's application runtime_env is
    merged in by Serve itself when deployed."""
    import ray

    base = dict(ray.get_runtime_context().runtime_env or {}) if ray.is_initialized() else {}
    return torch_runtime_env(base=base)


def shard_actor_options(cpus: float, gpus: float) -> dict[str, Any]:
    """A shard replica's ``ray_actor_options``: ``gpus`` (serving.gpus_per_replica; a fraction
    shares a GPU) only when above 0, so a CPU deployment asks Ray for no GPU. The gateway
    computes no model and never takes a GPU. Idle OpenMP threads sleep
    (:func:`replica_runtime_env`)."""
    if isinstance(gpus, bool) or not isinstance(gpus, int | float) or gpus < 0:
        raise ValueError(
            f"shard_gpus (serving.gpus_per_replica) must be a number >= 0, got {gpus!r}"
        )
    opts: dict[str, Any] = {"num_cpus": cpus, "runtime_env": replica_runtime_env()}
    if gpus > 0:
        opts["num_gpus"] = float(gpus)
    return opts


def gateway_actor_options() -> dict[str, Any]:
    """A gateway replica's ``ray_actor_options``: the deployment's own (its CPU sliver) and, as
    for the shards, sleeping OpenMP threads (it imports torch, e.g. for a text tokenizer)."""
    return {**(Gateway.ray_actor_options or {}), "runtime_env": replica_runtime_env()}


def build_app(args: dict[str, Any]) -> Application:
    """``args``: the fields of :class:`GatewaySettings` (storage, run_id, policy, ...), plus
    optional ``shard_cpus`` (CPUs reserved per shard replica, default 0.1), ``shard_gpus``
    (GPUs per shard replica, default the run's ``serving.gpus_per_replica``) and
    ``num_replicas`` (gateway replicas, default 1: each fences itself through the storage
    root, so any number is safe). ``storage`` must be absolute or a URI."""
    args = dict(args)
    shard_cpus = float(args.pop("shard_cpus", 0.1))
    shard_gpus = args.pop("shard_gpus", None)
    num_replicas = args.pop("num_replicas", 1)
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
    settings = GatewaySettings(**args)
    storage = check_storage(settings.storage)
    get_policy(settings.policy)  # fail here, with the list of presets, not in a replica
    ctx = open_run(storage, settings.run_id)
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
    return Gateway.options(
        name="gateway", num_replicas=num_replicas, ray_actor_options=gateway_actor_options()
    ).bind(settings.model_dump() | {"storage": ctx.storage.uri}, *handles)


def app_from_env(env: dict[str, str] | None = None) -> Application:
    """The application of the run named by ``RAY_UNLEARN_STORAGE`` and ``RAY_UNLEARN_RUN``
    (and ``RAY_UNLEARN_POLICY``, default lazy-wait) in ``env`` (default: os.environ)."""
    env = os.environ if env is None else env
    missing = [k for k in (STORAGE_ENV, RUN_ENV) if not env.get(k)]
    if missing:
        raise ValueError(
            f"ray_unlearn.serve.app:app reads the run from the environment: set "
            f"{' and '.join(missing)} (the storage root, absolute or a URI, and the run id "
            "printed by `ray-unlearn train`); in a Serve config, under runtime_env.env_vars"
        )
    args: dict[str, Any] = {
        "storage": check_storage(env[STORAGE_ENV], where=STORAGE_ENV),
        "run_id": env[RUN_ENV],
    }
    if env.get(POLICY_ENV):
        args["policy"] = env[POLICY_ENV]
    return build_app(args)


def __getattr__(name: str) -> Any:
    # `app` is built on access, not on import: importing build_app (the CLI, tests) needs no
    # environment, and each import by Serve (serve build, the deploy task) reads it afresh.
    if name == "app":
        return app_from_env()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
