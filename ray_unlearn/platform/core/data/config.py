"""The ``data`` section of a run's config: where the records come from and how to read and
split them (:class:`DataConfig`), and the generated dataset's parameters
(:class:`SyntheticConfig`)."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from ray_unlearn.platform.core.config_errors import Problems, did_you_mean

#: Names of the bundled sources accepted by ``DataConfig.source``.
BUNDLED = ("digits", "synthetic", "bbcnews", "mnist1d")
#: The bundled sources' own columns (the generated tables': data/bundled.py, data/text.py):
#: the label, and the texts of a text source (None: the features are a ``features`` column).
_BUNDLED_LABEL = "label"
_BUNDLED_TEXT: dict[str, str | None] = {"bbcnews": "text"}

_SOURCE_HELP = (
    "data.source must be 'digits', 'synthetic', 'bbcnews', 'mnist1d', or a Parquet file/directory "
    "given as a local "
    "path or a pyarrow.fs URI (s3://bucket/key.parquet, gs://..., hdfs://..., file:///...)"
)


class SyntheticConfig(BaseModel):
    """Generated data. ``purchase``: 600 binary features and 100 classes shaped like the
    Purchase-100 benchmark (customers' purchase vectors); ``custom``: Gaussian class blobs
    (20 features, 4 classes unless given)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: Literal["purchase", "custom"] = Field(
        "purchase", description="purchase: Purchase-100-like binary data; custom: Gaussian blobs."
    )
    n_samples: int = Field(20000, ge=10, description="Rows to generate.")
    n_features: int | None = Field(
        None, ge=1, description="Features per row; None: 600 (purchase) or 20 (custom)."
    )
    n_classes: int | None = Field(
        None, ge=2, description="Classes; None: 100 (purchase) or 4 (custom)."
    )
    seed: int = Field(0, ge=0, description="Generator seed (data and owners).")
    samples_per_owner: float = Field(
        5.0, ge=1.0, description="Mean samples per owner (sizes vary, at least 1 each)."
    )

    @property
    def features(self) -> int:
        """The number of features after preset defaults."""
        if self.n_features is not None:
            return self.n_features
        return 600 if self.preset == "purchase" else 20

    @property
    def classes(self) -> int:
        """The number of classes after preset defaults."""
        if self.n_classes is not None:
            return self.n_classes
        return 100 if self.preset == "purchase" else 4

    @model_validator(mode="after")
    def _enough_samples(self) -> SyntheticConfig:
        if self.classes > self.n_samples:
            raise ValueError(
                f"n_classes ({self.classes}) exceeds n_samples ({self.n_samples}); "
                "every class needs samples"
            )
        return self


class Mnist1dConfig(BaseModel):
    """MNIST-1D generated offline by the ``mnist1d`` package (40 features, 10 classes)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    n_samples: int = Field(
        5000, ge=10, description="Rows to generate (a multiple of 10: n/10 per class)."
    )
    seed: int = Field(0, ge=0, description="Generator seed (the signals; owners use data.seed).")

    @field_validator("n_samples")
    @classmethod
    def _per_class(cls, v: int) -> int:
        if v % 10:
            raise ValueError(f"must be a multiple of 10 (n/10 rows per class), got {v}")
        return v


class DataConfig(BaseModel):
    """Where the records come from and how to read and split them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    source: str = Field(
        "digits",
        description="'digits', 'synthetic', 'bbcnews', 'mnist1d', or a Parquet file/directory "
        "(local path or "
        "pyarrow.fs URI such as s3://bucket/key.parquet).",
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    mnist1d: Mnist1dConfig = Field(default_factory=Mnist1dConfig)
    samples_per_owner: float = Field(
        4.0,
        ge=1.0,
        description="digits, mnist1d: mean samples per owner (sizes vary, at least 1 each).",
    )
    label_column: str = Field("label", min_length=1, description="Integer class column.")
    features_column: str | None = Field(
        None,
        description="A list<number> column; None: 'features' if present, else every numeric "
        "column other than sample_id / owner_id / the label.",
    )
    text_column: str | None = Field(
        None,
        description="A string column of raw texts, tokenised by the model component "
        "(model.component hf_encoder) into the features; 'bbcnews' uses 'text'.",
    )
    num_classes: int | None = Field(
        None, ge=2, description="None: from the file's metadata, else max label + 1."
    )
    feature_shape: list[int] | None = Field(
        None,
        description="Per-sample shape for the model, e.g. [1, 8, 8]; None: (1, 8, 8) for "
        "digits, the file's metadata, else (D,).",
    )
    test_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of samples held out (by hash of the id)."
    )
    seed: int = Field(
        0, ge=0, description="Seed of the digits / mnist1d owner assignment and of the split."
    )
    compact: Literal["on_delete", "manual"] = Field(
        "on_delete",
        description="When the run's own copy of the data drops deleted rows: 'on_delete' (as "
        "each deletion is done) or 'manual' (`ray-unlearn compact --run ID`; the audit lists "
        "what waits).",
    )

    image_column: str | None = Field(
        None,
        description="A column of encoded images (PNG/JPEG bytes) to use as the features, "
        "decoded at load by data.image_transform; the per-sample shape is the decoded (C, H, W).",
    )
    image_transform: str | None = Field(
        None,
        description="Decoder of data.image_column, 'package.module:function' called as "
        "function(data: bytes, **image_transform_args) -> float array (C, H, W); None = the "
        "built-in Pillow decoder (PNG/JPEG to [0, 1]; args mode: L|RGB|RGBA, size: [H, W]).",
    )
    image_transform_args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the image decoder."
    )

    @model_validator(mode="after")
    def _one_feature_source(self) -> DataConfig:
        """At most one of text / image / features column names the features; the image
        decoder's settings need the image column, and the decoder is imported here (a bad
        path fails now, not in every worker). Every problem is reported at once."""
        problems = []
        named = {
            k: v
            for k, v in (
                ("text_column", self.text_column),
                ("image_column", self.image_column),
                ("features_column", self.features_column),
            )
            if v is not None
        }
        if len(named) > 1:
            both = " and ".join(f"data.{k} ({v!r})" for k, v in sorted(named.items()))
            problems.append(f"{both} each name the features: set one")
        if self.image_column is None and (self.image_transform or self.image_transform_args):
            problems.append(
                "data.image_transform / image_transform_args decode data.image_column: set it too"
            )
        elif self.image_column is not None:
            from ray_unlearn.platform.core.data.columns import resolve_transform

            try:
                resolve_transform(self.image_transform)
            except ValueError as e:
                problems.append(str(e))
        problems += self._bundled_columns()
        if problems:
            raise Problems(problems)
        return self

    def _bundled_columns(self) -> list[str]:
        """A bundled source's columns are its own: a column setting meant for a Parquet
        source would otherwise be silently ignored."""
        if self.source not in BUNDLED:
            return []
        text = _BUNDLED_TEXT.get(self.source)
        given = {
            "features_column": self.features_column,
            "image_column": self.image_column,
            # bbcnews reads its texts from text_column, which may name its own column
            "text_column": None if self.text_column == text else self.text_column,
            "label_column": None if self.label_column == _BUNDLED_LABEL else self.label_column,
        }
        bad = [f"data.{k} ({v!r})" for k, v in given.items() if v is not None]
        if not bad:
            return []
        own = f"label {_BUNDLED_LABEL!r}" + (f", texts {text!r}" if text else "")
        one = len(bad) == 1
        return [
            f"data.source is the bundled {self.source!r}, whose columns are fixed ({own}); "
            f"{' and '.join(bad)} {'is' if one else 'are'} for a Parquet source: unset "
            f"{'it' if one else 'them'}, or set data.source to a Parquet file or directory"
        ]

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError(f"must not be empty; {_SOURCE_HELP}")
        looks_like_path = "/" in v or "." in v or os.sep in v or "://" in v
        if v not in BUNDLED and not looks_like_path:
            raise ValueError(
                f"unknown bundled dataset {v!r}{did_you_mean(v, list(BUNDLED))}; {_SOURCE_HELP} "
                f"(write ./{v} for a local directory of that name)"
            )
        return v

    @field_validator("feature_shape")
    @classmethod
    def _shape(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(s < 1 for s in v)):
            raise ValueError(f"must be a non-empty list of positive sizes, e.g. [1, 8, 8]; got {v}")
        return v

    @field_validator("features_column", "text_column", "image_column")
    @classmethod
    def _features_column(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a column name or null")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # unset text and image settings are left out: configs without them dump (and
        # digest) as before
        out = handler(self)
        if self.source != "mnist1d":  # configs of other sources dump (and digest) as before
            out.pop("mnist1d", None)
        if self.text_column is None:
            out.pop("text_column", None)
        if self.image_column is None:
            for k in ("image_column", "image_transform", "image_transform_args"):
                out.pop(k, None)
        return out
