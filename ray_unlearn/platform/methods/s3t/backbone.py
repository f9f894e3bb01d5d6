"""S3T's public split and backbone: the owners drawn into the public split, the backbone
pre-trained on them and frozen, and the full fine-tuning reference S3T is compared with."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ray_unlearn.platform.core.config import ModelConfig, TrainingConfig
from ray_unlearn.platform.core.training import ShardData, derive_seed, init_model, train_stage
from ray_unlearn.platform.methods.s3t.adapters import _freeze
from ray_unlearn.platform.methods.s3t.config import S3TConfig

BACKBONE_STREAM = 0x7FFE  # seed-stream id of the backbone (no real shard has it)
FULL_FINETUNE_STREAM = 0x7FFD  # seed-stream id of the full fine-tuning reference
_PUBLIC = 0x5055424C  # "PUBL"


def public_mask(owner_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for the rows whose owner is drawn into the public split (whole owners, about
    ``fraction`` of them, a function of (seed, the sorted owner set))."""
    owners, inverse = np.unique(np.asarray(owner_ids).astype(str), return_inverse=True)
    u = np.random.default_rng(derive_seed(seed, _PUBLIC)).random(len(owners))
    return (u < fraction)[inverse]


def shard_data_from(features, labels, sample_ids, stream: int) -> ShardData:
    """One-slice :class:`ShardData` (for the backbone and the full fine-tuning reference)."""
    return ShardData(
        shard=stream,
        sample_ids=np.asarray(sample_ids, dtype=np.int64),
        slices=np.zeros(len(sample_ids), dtype=np.int32),
        features=torch.as_tensor(np.ascontiguousarray(features), dtype=torch.float32),
        labels=torch.as_tensor(np.asarray(labels, dtype=np.int64)),
        num_slices=1,
    )


def _full_weight_cfg(cfg: S3TConfig, epochs: int) -> TrainingConfig:
    return TrainingConfig(
        epochs=epochs, batch_size=cfg.batch_size, lr=cfg.pretrain_lr, optimizer="adam"
    )


def pretrain_backbone(
    model_cfg: ModelConfig,
    feature_shape,
    num_classes: int,
    public: ShardData,
    cfg: S3TConfig,
    seed: int,
    *,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build the model (seeded on the CPU generator, then moved to ``device``), fully
    fine-tune it there on the public rows for ``pretrain_epochs`` passes at
    ``pretrain_lr``, and freeze it. It stays on ``device``: the shards' orders train there."""
    model = init_model(model_cfg, feature_shape, num_classes, seed, BACKBONE_STREAM)
    model.to(device)
    if cfg.pretrain_epochs > 0 and len(public):
        train_stage(model, public, 0, _full_weight_cfg(cfg, cfg.pretrain_epochs), seed)
    model.eval()
    return _freeze(model)


def full_finetune(backbone: nn.Module, data: ShardData, cfg: S3TConfig, seed: int) -> nn.Module:
    """Reference: every parameter of a copy of the backbone trained on ``data`` (one
    slice) for ``cfg.epochs`` passes at the full-weight rate (``pretrain_lr``)."""
    model = copy.deepcopy(backbone)
    for p in model.parameters():
        p.requires_grad_(True)
    one = ShardData(
        FULL_FINETUNE_STREAM,
        data.sample_ids,
        np.zeros(len(data), dtype=np.int32),
        data.features,
        data.labels,
        1,
    )
    train_stage(model, one, 0, _full_weight_cfg(cfg, cfg.epochs), seed)
    model.eval()
    return _freeze(model)
