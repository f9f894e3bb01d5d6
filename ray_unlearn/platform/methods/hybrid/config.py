"""The ``hybrid:`` config section (strategies ``dpus``, ``hs``, ``ohs``) and its checks
against the rest of a run config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

APPROXIMATE_STRATEGIES = ("dpus", "hs", "ohs")  # need hybrid.record


class HybridConfig(BaseModel):
    """Hybrid exact/approximate unlearning (strategies ``dpus``, ``hs``, ``ohs``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    record: bool = Field(
        False,
        description="Record each training batch's parameter update and sample ids beside "
        "every slice checkpoint (what DPUS subtracts). Needed by dpus/hs/ohs.",
    )
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Encoding of the recorded updates (storage vs. precision)."
    )
    threshold: float = Field(
        0.04,
        ge=0,
        description="HS/OHS: exact retraining when the predicted retraining time of a batch "
        "of requests is <= this; otherwise a direct parameter update (DPUS).",
    )
    threshold_unit: Literal["fraction", "seconds"] = Field(
        "fraction",
        description="fraction: of the predicted time of a full retrain of every shard; "
        "seconds: predicted seconds.",
    )
    scope: Literal["batch", "shard"] = Field(
        "batch",
        description="batch: one decision for a whole batch of requests (its workload summed "
        "over the affected shards); shard: one decision per affected shard.",
    )
    route_gap: float | None = Field(
        None,
        ge=0,
        le=1,
        description="HS/OHS: a shard's part of a batch that the workload rule sends to DPUS is "
        "retrained exactly instead when the shard's serving model gives the revoked rows a "
        "mean true-class probability more than this above what the other shards' serving "
        "models (which never saw them) give: rows the model remembers, which a direct update "
        "leaves recognisable to a membership attack. None: the workload rule alone.",
    )
    dpus_scale: Literal["batch", "share"] = Field(
        "share",
        description="batch: subtract the whole update of every batch that held a revoked "
        "sample (the paper's DPUS); share: subtract dpus_share_factor times the revoked "
        "samples' share of it (count / batch size).",
    )
    dpus_share_factor: float = Field(
        8.0,
        ge=1,
        description="share: subtract this many times the revoked samples' share of each "
        "batch update (at most the whole update).",
    )
    dpus_momentum: bool = Field(
        False,
        description="Remove each revoked batch's gradient as it acted through the optimizer's "
        "momentum (this and the following steps) rather than its step's raw update, which "
        "with momentum (Adam, SGD 0.9) mostly carries earlier batches' gradients.",
    )
    ohs_slices: Literal["last", "affected", "all"] = Field(
        "affected",
        description="OHS fine-tunes the serving model on the remaining rows of: the last "
        "slice, the first affected slice onward, or all slices.",
    )
    ohs_validation_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Share of the shard's remaining rows held out (not trained on) to stop "
        "OHS fine-tuning when their loss stops improving.",
    )
    ohs_max_epochs: int = Field(2, ge=0, description="Cap on OHS fine-tuning passes.")
    ohs_patience: int = Field(
        1, ge=1, description="Passes without a lower validation loss before OHS stops."
    )
    ohs_lr: float | None = Field(
        1e-4, gt=0, description="OHS fine-tuning learning rate; None = training.lr."
    )
    calibrate_forget: bool = Field(
        False,
        description="After every direct parameter update (dpus, and hs/ohs when they take "
        "it), raise the revoked rows' loss on the serving model to that of rows it never saw "
        "(other shards' rows: it needs two or more shards), with a retain loss beside it "
        "(platform/methods/hybrid/calibration.py calibrate_forget).",
    )
    calibrate_depth: int | None = Field(
        2,
        ge=1,
        description="How many of the newest corrected snapshots to calibrate: None = all "
        "(restart points too, so a later exact retrain does not restart from weights that "
        "still fit the revoked rows); 1 = the serving one only; 2 = it and the restart point "
        "of a one-stage exact retrain (what hs does at a small threshold).",
    )
    calibrate_fraction: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Stop once this share of the revoked rows' total shortfall below their "
        "targets is closed (1: every row at its target).",
    )
    calibrate_target: Literal["quantile", "teacher"] = Field(
        "quantile",
        description="quantile: raise each revoked row's loss to a rank-matched loss of other "
        "shards' rows on this shard's model; teacher: move each revoked row's prediction to "
        "the mean prediction of the other shards' models at the same stage (models that "
        "never saw it), falling back to quantile where no such shard exists.",
    )
    calibrate_params: Literal["all", "head", "body"] = Field(
        "body",
        description="Which weights calibration may change: all; body: the feature layers "
        "(the output layer stays: its class weights are shared by every row of a class, "
        "so moving them to forget a few rows costs their whole class); head: the output "
        "layer only.",
    )
    calibrate_batch_size: int | None = Field(
        None, ge=1, description="Retain rows per calibration step; None = training.batch_size."
    )
    calibrate_reference_rows: int = Field(
        1024, ge=1, description="Other shards' rows whose losses set the calibration targets."
    )
    calibrate_max_steps: int = Field(
        100, ge=0, description="Cap on calibration steps per shard and request batch."
    )
    calibrate_lr: float | None = Field(
        3e-4,
        gt=0,
        description="Calibration learning rate; None = training.lr. A fresh Adam's first "
        "steps move every weight by about the rate: at the training rate (1e-3 on Purchase) "
        "they overshoot the targets and cost accuracy, at 1e-4 they take too many steps.",
    )


def config_problems(cfg) -> list[str]:
    """The run config's contradictions that involve ``hybrid:``."""
    problems: list[str] = []
    if getattr(cfg, "hybrid", None) is None:  # validated without the method sections
        return problems
    if cfg.unlearning.strategy in APPROXIMATE_STRATEGIES and not cfg.hybrid.record:
        problems.append(
            f"unlearning.strategy={cfg.unlearning.strategy} subtracts recorded training "
            "updates: set hybrid.record=true (contributions are recorded while training)"
        )
    if cfg.hybrid.threshold_unit == "fraction" and cfg.hybrid.threshold > 1:
        problems.append(
            f"hybrid.threshold ({cfg.hybrid.threshold}) is a fraction of a full retrain "
            "(hybrid.threshold_unit=fraction): it must be <= 1"
        )
    return problems
