"""Accuracy of the ensemble and of the single-model reference it is compared with."""

from __future__ import annotations

import time

import numpy as np
import torch

from ray_unlearn.platform.core.aggregate import aggregate
from ray_unlearn.platform.core.models import build_model
from ray_unlearn.platform.core.run import RunContext
from ray_unlearn.platform.core.runtime import load_serving_model
from ray_unlearn.platform.core.training import ShardData, predict_proba, train_shard

SINGLE_MODEL_SHARD = 0x7FFF  # seed-stream id of the one-model reference (no real shard has it)
# seed stream of the held-out rows an accuracy trigger or a sweep validates on ("VALD"): the
# same hash of the same ids wherever validation rows are picked
VALIDATION_STREAM = 0x56414C44


def ensemble_accuracy(shard_probs: dict[int, np.ndarray], labels: np.ndarray, rule: str) -> float:
    """Accuracy of the aggregate of ``shard_probs`` (shard -> (n, classes)) on ``labels``."""
    if not shard_probs:
        raise ValueError("no live shard model: every shard is empty")
    pred, _ = aggregate(np.stack([shard_probs[k] for k in sorted(shard_probs)]), rule)
    return float((pred == labels).mean())


def train_single_model(ctx: RunContext, exclude=()) -> tuple[torch.nn.Module, float]:
    """One model on all live training rows, same epochs/optimizer: the no-sharding reference.

    Returns (model, seconds).
    """
    recs = ctx.split_records("train", exclude)
    data = ShardData(
        shard=SINGLE_MODEL_SHARD,
        sample_ids=recs.sample_ids,
        slices=np.zeros(len(recs), dtype=np.int32),
        features=torch.from_numpy(np.ascontiguousarray(recs.features)),
        labels=torch.from_numpy(recs.labels.astype(np.int64)),
        num_slices=1,
    )
    cfg = ctx.config
    t0 = time.perf_counter()
    (stage,) = train_shard(
        data,
        cfg.model,
        cfg.training,
        seed=cfg.seed,
        feature_shape=ctx.feature_shape,
        num_classes=ctx.num_classes,
    )
    seconds = time.perf_counter() - t0
    model = build_model(cfg.model, ctx.feature_shape, ctx.num_classes)
    model.load_state_dict(stage.state)
    return model, seconds


def model_accuracy(model: torch.nn.Module, features: np.ndarray, labels: np.ndarray) -> float:
    probs = predict_proba(model, torch.from_numpy(np.ascontiguousarray(features)))
    return float((probs.argmax(1).numpy() == labels).mean())


def serving_accuracy(ctx: RunContext) -> float:
    """Test accuracy of the registry's serving versions (live test samples only), in process."""
    test = ctx.split_records("test", ctx.deletion_log.deleted_sample_ids())
    x = torch.from_numpy(np.ascontiguousarray(test.features))
    probs = {}
    for k, vid in ctx.model_store.registry().serving_versions().items():
        probs[k] = predict_proba(load_serving_model(ctx, vid), x).numpy()
    return ensemble_accuracy(probs, test.labels, ctx.config.unlearning.aggregation)
