"""The Tune trainable of a sweep trial, and the OpenMP environment its process trains under.

Each trial runs in a Tune actor of its own (the sweep leaves ``reuse_actors`` off), which
trains torch in process (:func:`ray_unlearn.tune.trial.run_trial`). Those actors should get
the rule every other Ray process that runs torch gets (:mod:`ray_unlearn.train.worker_env`:
``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy; ``OMP_NUM_THREADS`` = the run's
torch threads, where Ray sets 1 for the trial's 1-CPU reservation). Tune builds the trial
actor's ``runtime_env`` itself (Ray 2.60 ``ray.tune.execution.class_cache``: a fixed list
of variables) and takes none per trainable; the job-wide ``ray.init(runtime_env=...)`` that
Ray suggests cannot be set by a sweep attached to a Ray already running, and would give
every trial one thread count. So the trial's own process sets the variables, before torch
is imported there: torch's OpenMP (libgomp) reads them once, when it is loaded.

That is why this module (what Tune unpickles in the trial's process to find
:func:`trainable`) imports neither torch nor anything of the platform that does: the trial
code (and torch) is imported inside :func:`trainable`, after :func:`prepare_trial_process`.
tests/tune/test_trainable.py holds both.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

POINT = "point"  # with variants, a trial's config is {POINT: {key: value, ...}}


def trial_params(config: dict[str, Any] | None) -> dict[str, Any]:
    """The sweep keys of a Tune trial config (see ``sweep._param_space``)."""
    config = dict(config or {})
    return dict(config[POINT]) if isinstance(config.get(POINT), dict) else config


def trial_threads(spec, params: dict[str, Any]) -> int:
    """The torch threads the trial's run will train with: its ``training.torch_threads``,
    or, for 0, what ``create_run`` pins it to (this machine's CPUs, at most 4)."""
    from ray_unlearn.tune.spec import trial_config

    return trial_config(spec, params).training.pinned_threads()


def prepare_trial_process(threads: int) -> bool:
    """Set worker_env's variables in this process for ``threads`` torch threads (the user's
    OMP_WAIT_POLICY is kept); False, changing nothing, when torch is already loaded here:
    its OpenMP has read its environment, and the run's ``set_num_threads`` alone applies."""
    from ray_unlearn.train.worker_env import torch_env_vars

    if "torch" in sys.modules:
        return False
    os.environ.update(torch_env_vars(threads))
    return True


def _workdir() -> Path:
    """Where a trial writes its run: the trial's working directory (Tune changes into it,
    unless RAY_CHDIR_TO_TRIAL_DIR=0; with keep_runs, Tune persists it to the trial's
    directory in the sweep's storage), else a fresh temporary directory.

    Not ``get_trial_dir()``: for a function trainable that is the driver's staging
    directory, which the driver copies to storage whenever it saves the experiment state;
    a run written there (and deleted once measured) raced that copy ("Saving experiment
    state ... FileNotFoundError") and uploaded every trial's run besides."""
    if os.environ.get("RAY_CHDIR_TO_TRIAL_DIR", "1") != "0":
        return Path.cwd()
    return Path(tempfile.mkdtemp(prefix="ru-trial-"))


def trainable(config: dict[str, Any], spec_json: dict[str, Any]) -> None:
    """One trial (Tune's function trainable): the process's environment first, then the
    trial, reporting after every deletion step; the last report carries the ensemble."""
    from ray_unlearn.tune.spec import SweepSpec

    spec = SweepSpec.model_validate(spec_json)
    params = trial_params(config)
    prepare_trial_process(trial_threads(spec, params))
    from ray import tune

    from ray_unlearn.tune.trial import run_trial  # torch is loaded here

    with tempfile.TemporaryDirectory(prefix="ru-ensemble-") as export:

        def report(metrics: dict[str, Any]) -> None:
            # the last report carries the ensemble as the trial's checkpoint: Tune copies it
            # to the sweep's storage, where the driver finds the chosen trial's to register
            if metrics.get("final"):
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(export))
            else:
                tune.report(metrics)

        run_trial(spec, params, _workdir(), report=report, export_dir=export)
