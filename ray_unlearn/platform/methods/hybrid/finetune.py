"""OHS fine-tuning: after a direct parameter update, a few seeded passes of the run's own
optimizer over a subset of the shard's rows (the last slice, the affected slices, or all),
stopped early on a fixed validation subset; the best pass's weights are kept."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ray_unlearn.platform.core.config import ModelConfig, TrainingConfig
from ray_unlearn.platform.core.models import build_model
from ray_unlearn.platform.core.training import (
    ShardData,
    StateDict,
    _optimizer,
    derive_seed,
    run_steps,
    snapshot,
)

if TYPE_CHECKING:
    from ray_unlearn.platform.methods.hybrid.contributions import ContributionRecorder

_FINETUNE, _VALIDATION = 0x4F485346, 0x4F485356  # "OHSF", "OHSV"


def validation_mask(sample_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A fixed pseudo-random ``fraction`` of samples (by id: the same samples every time)."""
    z = np.asarray(sample_ids, dtype=np.int64).astype(np.uint64)
    z = z + np.uint64(derive_seed(seed, _VALIDATION) & 0xFFFFFFFFFFFF)
    with np.errstate(over="ignore"):  # splitmix64 finaliser (wraps modulo 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def finetune_rows(data: ShardData, first: int, which: str) -> np.ndarray:
    """Rows of the OHS fine-tuning subset: the last slice, the affected slices, or all."""
    if which == "last":
        return np.flatnonzero(data.slices == data.num_slices - 1)
    if which == "affected":
        return np.flatnonzero(data.slices >= first)
    if which == "all":
        return np.arange(len(data))
    raise ValueError(f"unknown OHS subset {which!r}; allowed: 'last', 'affected', 'all'")


@dataclass
class FinetuneResult:
    state: StateDict
    steps: int  # steps kept (up to the best validation loss)
    epochs: int  # passes run
    best_epoch: int
    val_before: float
    val_after: float
    train_rows: int
    val_rows: int
    seconds: float = 0.0


@torch.no_grad()
def _loss(model, x, y) -> float:
    model.eval()
    return float(F.cross_entropy(model(x), y)) if len(y) else float("nan")


def finetune(
    state: StateDict,
    data: ShardData,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    *,
    model_cfg: ModelConfig,
    train_cfg: TrainingConfig,
    feature_shape,
    num_classes: int,
    lr: float | None,
    max_epochs: int,
    patience: int,
    seed_parts: tuple[int, ...],
    stage: int,
    recorder: ContributionRecorder | None = None,
) -> FinetuneResult:
    """Fine-tune ``state`` on ``train_rows`` of ``data`` in seeded passes (the run's optimizer,
    batch size and ``lr``) until the loss on ``val_rows`` has not improved for ``patience``
    passes (or ``max_epochs``); returns the weights of the best pass. Each step is given to
    ``recorder`` as a step of ``stage``; the caller keeps the first ``result.steps``."""
    t0 = time.perf_counter()
    model = build_model(model_cfg, feature_shape, num_classes)
    model.load_state_dict(state)
    xv = data.features[torch.from_numpy(val_rows)]
    yv = data.labels[torch.from_numpy(val_rows)]
    best = _loss(model, xv, yv)
    before, best_state, best_epoch, best_steps = best, state, 0, 0
    if not len(train_rows) or not len(val_rows) or max_epochs == 0:
        n_train, n_val = len(train_rows), len(val_rows)
        return FinetuneResult(state, 0, 0, 0, before, best, n_train, n_val, 0.0)
    cfg = train_cfg.model_copy(update={"lr": lr or train_cfg.lr})
    opt = _optimizer(model, cfg)
    steps, bad, epoch = 0, 0, 0
    for epoch in range(1, max_epochs + 1):
        rng = np.random.default_rng(derive_seed(*seed_parts, epoch, _FINETUNE))
        perm = train_rows[rng.permutation(len(train_rows))]
        batches = [perm[i : i + cfg.batch_size] for i in range(0, len(perm), cfg.batch_size)]
        hook = None
        if recorder is not None:  # step numbers continue across passes: one optimizer run

            def hook(step, rows, before, after, first=steps):
                recorder(stage, first + step, data.sample_ids[rows], before, after)

        run_steps(model, opt, data.features, data.labels, batches, on_step=hook)
        steps += len(batches)
        val = _loss(model, xv, yv)
        if val < best:
            best, best_state, best_epoch, best_steps, bad = val, snapshot(model), epoch, steps, 0
        else:
            bad += 1
            if bad >= patience:
                break
    return FinetuneResult(
        best_state,
        best_steps,
        epoch,
        best_epoch,
        before,
        best,
        len(train_rows),
        len(val_rows),
        time.perf_counter() - t0,
    )
