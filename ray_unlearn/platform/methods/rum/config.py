"""The ``rum:`` config section (strategy ``rum``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ray_unlearn.platform.core.config_errors import did_you_mean

# the keys of methods/approximate.py's ALGORITHMS (a test keeps them equal): named here so
# that validating a config does not import torch
ALGORITHM_NAMES = (
    "finetune",
    "neggrad",
    "neggrad_plus",
    "l1_sparse",
    "random_label",
    "salun",
    "scrub",
)


class RumConfig(BaseModel):
    """Memorization-aware approximate unlearning (strategy ``rum``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    score: Literal[
        "confidence", "max_confidence", "entropy", "binary_accuracy", "holdout_kl", "exact"
    ] = Field(
        "confidence",
        description="Memorization score that splits the deleted samples into thirds. The four "
        "training proxies are running means over the shard's slice checkpoints, read when the "
        "request executes (nothing to precompute); holdout_kl and exact are read from the "
        "scores stored with the run (`ray-unlearn scores --run <id> --score <name>` stores them).",
    )
    low: str | None = Field("finetune", description="Algorithm for the low-memorization third.")
    medium: str | None = Field("neggrad_plus", description="... for the medium third.")
    high: str | None = Field("salun", description="... for the high third (null: skip).")
    epochs: int = Field(3, ge=1, description="Passes of each group's algorithm.")
    lr: float = Field(1e-3, gt=0)
    route_quantile: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Memorization-aware routing: a request whose samples' mean memorization "
        "ranks at or above this quantile of the shard's rows is retrained exactly (SISA); "
        "the others are unlearnt approximately. None: always approximate.",
    )
    route_by: Literal["memorization", "random"] = Field(
        "memorization",
        description="random: route the same share of requests (1 - route_quantile) to exact "
        "retraining by a seeded coin instead of by memorization: the control that shows "
        "whether memorization is what makes routing pay.",
    )

    @field_validator("low", "medium", "high")
    @classmethod
    def _algorithm(cls, v: str | None) -> str | None:
        if v is not None and v not in ALGORITHM_NAMES:
            raise ValueError(
                f"unknown algorithm {v!r}; allowed: {', '.join(ALGORITHM_NAMES)} or null"
                + did_you_mean(v, list(ALGORITHM_NAMES))
            )
        return v

    @model_validator(mode="after")
    def _some_algorithm(self) -> RumConfig:
        if self.low is None and self.medium is None and self.high is None:
            raise ValueError(
                "rum.low, rum.medium and rum.high are all null: name an algorithm for at "
                "least one group, or nothing is unlearnt"
            )
        return self
