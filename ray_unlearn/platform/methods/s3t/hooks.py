"""What S3T tells the registry: its runs are their own kind (trained, held and served by
this package), their public split cannot be deleted, and shards left too shallow by a
deletion are retrained afterwards. Imports are deferred: registering S3T loads no model code."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray_unlearn.platform.methods.s3t.config import S3TConfig

if TYPE_CHECKING:  # only for annotations: validating a config must not load numpy (~0.25 s)
    import numpy as np

KIND = "s3t"


def _cfg(config) -> S3TConfig:
    return config.s3t or S3TConfig()


def train(ctx) -> dict[str, Any] | None:
    if ctx.config.unlearning.strategy != KIND:
        return None
    from ray_unlearn.platform.methods.s3t.runtime import train_s3t_run

    return train_s3t_run(ctx)


def runtime(ctx, shard: int, deleted=()):
    from ray_unlearn.platform.methods.s3t.runtime import S3TShardRuntime

    return S3TShardRuntime(ctx, shard, deleted)


def undeletable(ctx) -> tuple[np.ndarray, str]:
    from ray_unlearn.platform.methods.s3t.runtime import public_sample_ids

    return (
        public_sample_ids(ctx),
        "the public split that pre-trained this S3T run's backbone, declared not subject to "
        "deletion",
    )


def restore_plan(ctx, results: dict[int, dict[str, Any]], predict_proba) -> dict[str, Any]:
    """A deletion only deactivates stages; a shard left too shallow (or every truncated
    shard, when the ensemble's validation accuracy fell too low) is retrained afterwards."""
    from ray_unlearn.platform.eval.accuracy import ensemble_accuracy
    from ray_unlearn.platform.methods.s3t.runtime import restore_candidates, validation_records

    def accuracy() -> float:
        val = validation_records(ctx)
        if not len(val.labels):
            raise ValueError(
                "s3t.retrain_accuracy_threshold needs validation rows: the run has no held-out "
                "rows (data.test_fraction) or s3t.validation_fraction selects none"
            )
        probs = predict_proba(val.features)
        return ensemble_accuracy(probs, val.labels, ctx.config.unlearning.aggregation)

    return restore_candidates(ctx, results, accuracy)


def chain_exact(ctx, entry) -> list[bool]:
    return [True] * len(entry.chain)  # deletions deactivate stages: never approximate


def serving_model(ctx, vid: str):
    """The stage model of ``vid`` on the device this process serves on (a GPU it may use
    unless the run says ``training.device: cpu``; the rule of the Serve replicas)."""
    from ray_unlearn.platform.methods.s3t.runtime import load_serving_model

    return load_serving_model(ctx, vid)


def background_restore(config) -> bool:
    return _cfg(config).background_restore


def sweep_problems(config, validation_fraction: float) -> list[str]:
    """An S3T trial's model against its slices and budget (what the run would refuse at
    training time), checked before the sweep starts, and its validation rows against the
    sweep's. The block structure depends only on the model's layers, so a stand-in input
    shape and class count are enough."""
    from ray_unlearn.platform.core.models import build_model
    from ray_unlearn.platform.methods.s3t.training import S3TConfigError, check_s3t

    msgs: list[str] = []
    try:
        model = build_model(config.model, (8,) if config.model.kind == "mlp" else (1, 8, 8), 2)
    except (ValueError, RuntimeError):
        model = None  # not an S3T problem: the run itself reports it
    if model is not None:
        try:
            check_s3t(_cfg(config), model, config.partition.slices)
        except S3TConfigError as e:
            msgs += [f"s3t: {ln.strip().removeprefix('- ')}" for ln in str(e).splitlines()[1:]]
    s3t_val = _cfg(config).validation_fraction
    if s3t_val > validation_fraction:
        msgs.append(
            f"s3t.validation_fraction={s3t_val} exceeds stream.validation_fraction="
            f"{validation_fraction}: rows S3T's accuracy trigger reads would count as test rows "
            "(lower it or raise stream.validation_fraction)"
        )
    return msgs


def check_model(config, model) -> None:
    """At run creation: the model has a trainable head and LoRA-adaptable blocks that fit
    the partition (S3TConfigError lists every problem)."""
    from ray_unlearn.platform.methods.s3t.adapters import check_s3t
    from ray_unlearn.platform.methods.s3t.config import S3TConfig

    check_s3t(config.s3t or S3TConfig(), model, config.partition.slices)
