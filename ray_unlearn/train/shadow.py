"""LiRA / U-LiRA shadow models as parallel Ray tasks (the attack is ``platform.lira``).

One task per shadow: it trains the shadow with the caller's ``train_fn`` and returns only
its (n,) confidences on the candidate rows (8 bytes a row), never the model. ``train_fn``
and the rows go to the object store once and every task reads them from there. The result
equals ``platform.lira.shadow_confidences`` shadow for shadow, provided ``train_fn`` is a
function of the mask alone (``MLPShadowTrainer`` is: its seed is derived from the mask).

CPUs: each task reserves ``cpus_per_shadow`` (default 1, matching the one torch thread of
``MLPShadowTrainer``), so on 2 cores at most 2 shadows train at once and they leave room
for nothing else; give less (e.g. 0.5) when other work must run beside them, at the cost
of time-slicing the cores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from ray_unlearn.platform.eval.lira import (
    Outputs,
    TrainFn,
    check_masks,
    shadow_confidence,
)
from ray_unlearn.train.worker_env import torch_runtime_env


@ray.remote
def _shadow(train_fn: TrainFn, mask: np.ndarray, x: Any, y: np.ndarray, outputs: Outputs):
    return shadow_confidence(train_fn, mask, x, y, outputs)


def shadow_confidences_ray(
    train_fn: TrainFn,
    masks: np.ndarray,
    x: Any,
    y: np.ndarray,
    outputs: Outputs = "probs",
    *,
    cpus_per_shadow: float = 1.0,
) -> np.ndarray:
    """(S, n) masks -> (S, n) confidences, the S shadows trained as Ray tasks in parallel."""
    masks = check_masks(masks, len(y))
    if not cpus_per_shadow > 0:
        raise ValueError(f"cpus_per_shadow must be > 0, got {cpus_per_shadow}")
    fn_ref, x_ref, y_ref = ray.put(train_fn), ray.put(x), ray.put(np.asarray(y))
    task = _shadow.options(num_cpus=cpus_per_shadow, runtime_env=torch_runtime_env())
    pending = [task.remote(fn_ref, m, x_ref, y_ref, outputs) for m in masks]
    return np.stack(ray.get(pending))  # in shadow order, whatever order they finished in


@ray.remote
def _call(fn: Any, mask: np.ndarray) -> Any:
    return fn(mask)


def map_shadows_ray(fn: Any, masks: np.ndarray, *, cpus_per_shadow: float = 1.0) -> list[Any]:
    """``[fn(m) for m in masks]``, each call a parallel Ray task; results in mask order.

    For shadows whose one training yields more than one confidence vector: U-LiRA of
    several unlearning methods trains each shadow once and unlearns its masked rows with
    every method (``platform.methods.hybrid.shadows.HybridShadow`` returns them all).
    ``fn`` goes to the object store once; it must be a function of the mask alone for the
    result to equal the in-process loop.
    """
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype != bool:
        raise ValueError(
            f"masks must be a bool (shadows, n) array; got {masks.dtype} {masks.shape}"
        )
    if not cpus_per_shadow > 0:
        raise ValueError(f"cpus_per_shadow must be > 0, got {cpus_per_shadow}")
    fn_ref = ray.put(fn)
    task = _call.options(num_cpus=cpus_per_shadow, runtime_env=torch_runtime_env())
    return ray.get([task.remote(fn_ref, m) for m in masks])
