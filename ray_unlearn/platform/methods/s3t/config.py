"""The ``s3t:`` config section (strategy ``s3t``). Cross-checks against a model and a
partition: :func:`ray_unlearn.platform.methods.s3t.training.check_s3t`."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

#: Linear layers LoRA wraps inside a block that is not itself Linear / Conv2d (a
#: transformer layer): the attention's query and value projections, under the names
#: BERT-like (query, value), Llama/OPT-like (q_proj, v_proj) and DistilBERT (q_lin, v_lin)
#: encoders give them.
DEFAULT_LORA_TARGETS = ("query", "value", "q_proj", "v_proj", "q_lin", "v_lin")


class S3TConfig(BaseModel):
    """S3T settings. Cross-checks against a model and a partition: :func:`check_s3t`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    budget: int = Field(3, ge=1, description="B: slice orders trained per shard.")
    selection: Literal["cyclic", "bms"] = Field(
        "cyclic", description="cyclic rotation or bipartite-matching selection of the orders."
    )
    deletion_prior: list[float] | None = Field(
        None, description="bms only: per-slice deletion probabilities (None = uniform)."
    )
    lora_rank: int = Field(4, ge=1, description="r of every LoRA adapter.")
    lora_alpha: float = Field(8.0, gt=0, description="LoRA alpha (scaling = alpha / r).")
    block_names: list[str] | None = Field(
        None,
        description="Module names of the adapted blocks, bottom to top; None = the "
        "model's blocks (model.parts.blocks; MLP: its hidden Linear layers, CNN: its conv "
        "layers, hf_encoder: its transformer layers).",
    )
    num_blocks: int | None = Field(
        None,
        ge=1,
        description="Adapt only the top num_blocks of the blocks (None: all). Independent of "
        "partition.slices R: stage i of an order adapts the i-th of R groups of blocks counted "
        "from the top (contiguous, sizes differing by at most one, larger groups on top); it "
        "must be >= R so every stage has a block of its own.",
    )
    lora_targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        min_length=1,
        description="Inside a block that is not itself Linear/Conv2d (a transformer layer), the "
        "last name components of the Linear layers LoRA wraps (the attention's query/value).",
    )
    public_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Part of the training data (by owner) that pre-trains the backbone; "
        "declared public: not subject to deletion.",
    )
    pretrain_epochs: int = Field(20, ge=0, description="Backbone passes over the public data.")
    epochs: int = Field(
        10, ge=1, description="Per order: passes over the shard's data (like training.epochs)."
    )
    lr: float = Field(1e-2, gt=0, description="Adam learning rate of the adapters and heads.")
    pretrain_lr: float = Field(
        2e-3,
        gt=0,
        description="Adam learning rate of full-weight training (the backbone, and the full "
        "fine-tuning reference); LoRA usually wants a larger rate than full training.",
    )
    batch_size: int = Field(32, ge=1)
    retrain_depth_threshold: int = Field(
        1,
        ge=1,
        description="A shard is queued for retraining when its best surviving prefix falls "
        "below this depth (1: only when it is dead).",
    )
    retrain_accuracy_threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Also retrain every truncated shard when the ensemble's accuracy on the "
        "validation rows falls below this (None: depth threshold only).",
    )
    validation_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Part of the held-out rows (seeded by sample id) the accuracy trigger "
        "measures; no training ever sees them.",
    )
    background_restore: bool = Field(
        True,
        description="Executor actors retrain too-shallow shards in the background (the "
        "deletion is answered first); a one-off in-process `forget` always restores inline.",
    )

    @field_validator("block_names")
    @classmethod
    def _names(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("must name at least one block, or be null for the model's defaults")
        bad = [n for n in v if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ValueError(f"block names must be non-empty strings, got {bad}")
        dup = sorted({n for n in v if v.count(n) > 1})
        if dup:
            raise ValueError(f"each block can be adapted once; repeated: {', '.join(dup)}")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # settings left at their defaults are left out: existing configs keep their digest
        out = handler(self)
        if self.num_blocks is None:
            out.pop("num_blocks", None)
        if list(self.lora_targets) == list(DEFAULT_LORA_TARGETS):
            out.pop("lora_targets", None)
        return out

    @field_validator("deletion_prior")
    @classmethod
    def _prior(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (
            not v or any(not math.isfinite(p) or p < 0 for p in v) or sum(v) <= 0
        ):
            raise ValueError(f"must be finite non-negative probabilities, not all 0; got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> S3TConfig:
        if self.deletion_prior is not None and self.selection != "bms":
            raise ValueError(
                "deletion_prior is only used by selection=bms; drop it or set selection: bms"
            )
        return self
