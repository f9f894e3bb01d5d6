"""U-LiRA shadows for the hybrid methods: one training, every variant's unlearning, a retrain.

U-LiRA (``platform/eval/lira.py``) fits, for every forget-candidate row, a Gaussian to the
confidence of shadow models that trained on the row and then *unlearned* it by the method
under test, and one to shadow models *retrained* without it. For the hybrid methods a
shadow is a whole SISA run trained with contribution recording (:class:`HybridShadow`):

1. a fresh run on the target's training rows (``train_rows``: a Parquet file of exactly
   those rows, ``test_fraction`` 0), with its own seed, so its partition plan, weights and
   batch order are its own (drawn from the mask, as ``lira.MLPShadowTrainer`` does);
2. for every variant, a hard-linked copy of that run (the platform never changes a file in
   place, so the copies diverge without touching each other) executes one single-owner
   request per owner of the masked rows, one at a time, as a user's stream would; its
   serving ensemble's confidence on every candidate row is kept;
3. every shard retrained from scratch without the masked rows: the "out" side.

The confidences are those of the served ``mean_prob`` answer (``lira.ensemble_confidence``
of the shards' logits, float64). A shadow returns (n,) confidences per variant and for
``"retrained"``; only the masked rows' entries are read by ``lira.fit_ulira``.

With no variants a shadow only retrains (nothing is trained with recording): an
independently seeded retrained model, the *null* a retrained target is scored against.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ray_unlearn.platform.core.config import RunConfig
from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
from ray_unlearn.platform.core.models import build_model
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.run import RunContext, create_run, open_run
from ray_unlearn.platform.eval.lira import ensemble_confidence, mask_seed
from ray_unlearn.platform.eval.mia import retrained_states, serving_states

RETRAINED = "retrained"


def link_copy(src: Path, dst: Path) -> None:
    """A copy of a local storage root made of hard links: instant and no extra disk. Safe
    because the platform never changes a file in place (writes go to a temp file renamed
    over the old name, deletions unlink), so the copies diverge without touching each other."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=os.link)


def states_confidence(
    ctx: RunContext, states: dict[int, dict[str, torch.Tensor]], x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """(n,) confidence of the mean-probability ensemble of ``states`` (by shard) on rows
    ``x`` (n, D) with labels ``y``: each shard's logits, averaged as probabilities."""
    if not states:
        raise ValueError("no shard model to score with: every shard is empty")
    feats = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    logits = []
    for k in sorted(states):
        net = build_model(ctx.config.model, ctx.feature_shape, ctx.num_classes)
        net.load_state_dict(states[k])
        net.eval()
        with torch.no_grad():
            logits.append(net(feats).double().numpy())  # (n, classes)
    return ensemble_confidence(np.stack(logits), y)  # (K, n, classes) -> (n,)


def serving_confidence(ctx: RunContext, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n,) confidence of the run's serving ensemble on rows ``x``."""
    return states_confidence(ctx, serving_states(ctx), x, y)


def unlearn_owners(ctx: RunContext, strategy: str, owners: list[str], prefix: str = "u") -> None:
    """One request per owner, each executed by ``strategy`` as it arrives. ``dpus`` hands a
    request it must refuse (rows an earlier DPUS left untracked) to ``hs``, which retrains
    that shard exactly, as benchmarks/hybrid.py's ``dpus`` stream does."""
    from ray_unlearn.platform.methods.hybrid.contributions import (
        purge_contributions,
        versions_without_contributions,
    )

    engine = UnlearningEngine(ctx, LocalShards(ctx))
    for i, owner in enumerate(owners):
        use = strategy
        if strategy == "dpus" and versions_without_contributions(
            ctx, ctx.plan.samples_of_owner(owner)
        ):
            use = "hs"
        engine.submit(owner_id=owner, request_id=f"{prefix}{i:05d}")
        (rec,) = engine.execute_pending(strategy=use)
        purge_contributions(ctx.storage, ctx.layout, rec.versions_retired)


@dataclass(frozen=True)
class Variant:
    """A hybrid variant as benchmarks/hybrid.py labels it: ``hs[calibrate_forget=true]``
    is strategy ``hs`` with that ``hybrid`` setting."""

    label: str
    strategy: str
    hybrid: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ShadowResult:
    confidences: dict[str, np.ndarray]  # variant label (and RETRAINED) -> (n,)
    seconds: dict[str, float]  # wall seconds of each part: train, each variant, retrain
    seed: int
    owners: list[str]  # the owners this shadow forgot, in request order


@dataclass(frozen=True, eq=False)  # eq=False: fields are arrays, compared by identity
class HybridShadow:
    """A U-LiRA ``train_fn`` for the hybrid methods: ``mask`` (n,) bool over the candidate
    rows -> :class:`ShadowResult`; the masked rows' owners are forgotten.

    ``config`` is the target run's (its model, training, partition and hybrid settings);
    the shadow replaces its storage (``work``/shadow-<seed>), seed (from ``seed`` and the
    mask) and data (``train_rows``, no test split). ``owners``, ``features``, ``labels``:
    the candidate rows' owner ids, features (n, D) and labels (n,).
    """

    config: RunConfig
    train_rows: str
    owners: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    variants: tuple[Variant, ...]
    work: str
    seed: int = 0

    def __post_init__(self) -> None:
        n = len(self.labels)
        if len(self.owners) != n or len(self.features) != n:
            raise ValueError(
                f"HybridShadow: owners ({len(self.owners)}), features ({len(self.features)}) "
                f"and labels ({n}) must cover the same candidate rows"
            )
        labels = [v.label for v in self.variants]
        if len(set(labels)) != len(labels) or RETRAINED in labels:
            raise ValueError(f"HybridShadow: variant labels must be unique, not {RETRAINED!r}")

    def shadow_config(self, mask: np.ndarray) -> RunConfig:
        seed = mask_seed(self.seed, mask) % 2**31
        cfg = self.config.model_copy(deep=True)
        cfg.seed = seed
        cfg.storage = str(Path(self.work) / f"shadow-{seed}")
        cfg.data.source = self.train_rows
        cfg.data.test_fraction = 0.0
        cfg.hybrid.record = True
        return cfg

    def __call__(self, mask: np.ndarray) -> ShadowResult:
        from ray_unlearn.platform.methods.hybrid.recording import train_and_record

        mask = np.asarray(mask, bool)
        if mask.shape != (len(self.labels),):
            raise ValueError(f"mask must be ({len(self.labels)},) bool; got {mask.shape}")
        cfg = self.shadow_config(mask)
        root = Path(cfg.storage)
        if root.exists():
            shutil.rmtree(root)
        # the masked rows' owners, in a seeded order: the requests of this shadow's stream
        owners = sorted(set(np.asarray(self.owners)[mask].tolist()))
        np.random.default_rng(cfg.seed).shuffle(owners)
        seconds: dict[str, float] = {}
        conf: dict[str, np.ndarray] = {}
        try:
            ctx = create_run(cfg)
            forgotten = np.concatenate([ctx.plan.samples_of_owner(o) for o in owners])
            if self.variants:
                t0 = time.perf_counter()
                train_and_record(ctx)
                seconds["train"] = time.perf_counter() - t0
            for j, v in enumerate(self.variants):
                t0 = time.perf_counter()
                link_copy(root, root.parent / f"{root.name}-v{j}")
                vctx = open_run(str(root.parent / f"{root.name}-v{j}"), ctx.run_id)
                for k, val in v.hybrid.items():
                    setattr(vctx.config.hybrid, k, val)
                unlearn_owners(vctx, v.strategy, owners)
                conf[v.label] = serving_confidence(vctx, self.features, self.labels)
                shutil.rmtree(root.parent / f"{root.name}-v{j}")
                seconds[v.label] = time.perf_counter() - t0
            t0 = time.perf_counter()
            trained = np.unique(ctx.plan.shards[ctx.plan.shards != TEST])
            states = retrained_states(ctx, forgotten, shards=trained.tolist())
            conf[RETRAINED] = states_confidence(ctx, states, self.features, self.labels)
            seconds[RETRAINED] = time.perf_counter() - t0
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return ShadowResult(conf, seconds, cfg.seed, owners)
