"""The OpenMP environment of the Ray processes that run torch: Ray Train workers, Ray tasks
(shadow models, memorization subsets), Serve replicas, and the executor's shard actors.

Two variables, given through each process's ``runtime_env.env_vars`` (Ray sets them before
the process imports torch; Serve and Ray Train merge them with the application's or job's
own env_vars):

* ``OMP_WAIT_POLICY=PASSIVE``, unless the environment that builds the options already sets a
  policy (the user's choice wins; a Serve application is built with its config's env_vars,
  a job's driver with its runtime_env). torch's OpenMP (libgomp) otherwise spins a waiting
  thread at every parallel region's end, burning the core that another process on the
  machine needs: the executor's 2-thread purchase stages took 8.5-17 s instead of 1.2-2.2 s
  with one busy process beside them (docs/methods/sisa.md). It changes when idle threads
  sleep, never how work is split: the weights are bit for bit the same
  (tests/train/test_executor_env.py).
* ``OMP_NUM_THREADS=<threads>`` when the caller knows the run's torch threads: Ray sets 1 in a
  process that reserves under one CPU, and torch imported under that variable trained the
  same steps 1.6-4.9x slower even after ``set_num_threads(threads)`` (train/executor.py
  ``actor_options``). The kernels' thread count is ``threads`` either way.

No ray import here: the options are plain dicts, unit-tested without a cluster.
"""

from __future__ import annotations

import os
from typing import Any

# torch's OpenMP threads sleep when idle instead of spinning
OMP_WAIT_POLICY = "PASSIVE"


def torch_env_vars(threads: int = 0) -> dict[str, str]:
    """The env_vars of a Ray process running torch with ``threads`` intra-op threads (0: not
    known here, leave OMP_NUM_THREADS to Ray)."""
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY") or OMP_WAIT_POLICY}
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def torch_runtime_env(threads: int = 0, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``runtime_env`` for ``.options()``, ``ray_actor_options`` or Ray Train's
    ``RunConfig(worker_runtime_env=...)``: ``base`` (a job's runtime_env, e.g. its pip or
    working_dir) with :func:`torch_env_vars` added to its env_vars; a variable ``base``
    already sets is the user's and is kept."""
    base = dict(base or {})
    return {**base, "env_vars": {**torch_env_vars(threads), **(base.get("env_vars") or {})}}
