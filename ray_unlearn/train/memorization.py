"""Feldman's memorization estimator with its M subset models as parallel Ray tasks.

The per-model work is ``platform.memorization.subset_model_correctness`` (1 CPU, 1 torch
thread each); this module only places the tasks and gathers their (mask, correctness)
rows, which ``memorization_from_runs`` turns into one score per sample. The results equal
the in-process estimator's (``exact_memorization``) model for model: each task's subset,
initial weights and batch order depend only on (seed, model index).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import ray

from ray_unlearn.platform.methods.rum.memorization import (
    SCORES,
    FitSpec,
    check_estimator,
    compute_run_scores,
    memorization_from_runs,
    subset_model_correctness,
)
from ray_unlearn.train.worker_env import torch_runtime_env


@ray.remote(num_cpus=1)
def _one(spec: FitSpec, x, y, keep: float, seed: int, index: int):
    return subset_model_correctness(spec, x, y, keep, seed, index)


def exact_memorization_ray(
    spec: FitSpec,
    x: np.ndarray,
    y: np.ndarray,
    *,
    models: int,
    keep: float = 0.7,
    seed: int = 0,
    on_done: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The estimator of ``platform.memorization.exact_memorization`` on the connected Ray;
    ``on_done(finished, models)`` after each model (a progress bar)."""
    check_estimator(models, keep)
    xr, yr = ray.put(np.ascontiguousarray(x)), ray.put(np.asarray(y))
    one = _one.options(runtime_env=torch_runtime_env())  # idle OpenMP threads sleep
    refs = [one.remote(spec, xr, yr, keep, seed, i) for i in range(models)]
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        if on_done is not None:
            on_done(models - len(pending), models)
    runs = ray.get(refs)  # in model order, whatever order the tasks finished in
    return memorization_from_runs(np.stack([r[0] for r in runs]), np.stack([r[1] for r in runs]))


@ray.remote(num_cpus=1)
def _timed(spec: FitSpec, x, y, keep: float, seed: int, index: int):
    c0 = time.process_time()
    mask, correct = subset_model_correctness(spec, x, y, keep, seed, index)
    return mask, correct, time.process_time() - c0


def subset_runs_ray(
    spec: FitSpec,
    x: np.ndarray,
    y: np.ndarray,
    indices: Sequence[int],
    *,
    keep: float = 0.7,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The estimator's models ``indices`` as parallel Ray tasks, unreduced: (M, n) subset
    masks, (M, n) correctness and (M,) CPU seconds of each model's task (training and the
    one prediction pass). More models can be added later by further indices (model i is
    the same whenever it is trained), e.g. until ``split_half_reliability`` is high enough;
    ``memorization_from_runs`` turns the rows into scores."""
    if not len(indices) or not 0 < keep < 1:
        raise ValueError(f"subset_runs_ray: indices ({len(indices)}) must name at least one "
                         f"model and keep must be in (0, 1), got {keep}")  # fmt: skip
    xr, yr = ray.put(np.ascontiguousarray(x)), ray.put(np.asarray(y))
    timed = _timed.options(runtime_env=torch_runtime_env())
    runs = ray.get([timed.remote(spec, xr, yr, keep, seed, int(i)) for i in indices])
    return (
        np.stack([r[0] for r in runs]),
        np.stack([r[1] for r in runs]),
        np.array([r[2] for r in runs]),
    )


def compute_run_scores_ray(ctx, names: Sequence[str] = SCORES, **kwargs) -> dict[str, float]:
    """``platform.memorization.compute_run_scores`` with the exact estimator's models as Ray
    tasks (the proxies train one model, in this process)."""
    return compute_run_scores(ctx, names, exact_runner=exact_memorization_ray, **kwargs)
