"""Datasets as owned records: who each sample belongs to, its label and its features.

Unlearning is about *people*: a deletion request names an owner (or single samples), so
every row carries a unique ``sample_id`` (int64) and an ``owner_id`` (string) next to its
label and features. This module turns a data source into an in-memory :class:`Records`:

* bundled sources that need no download, materialised once as Parquet under the storage
  root so every process of a run (and every rerun) sees byte-identical data:
  ``digits`` (scikit-learn's 8x8 digits) and ``synthetic`` (a Purchase-100-like generator,
  or Gaussian blobs);
* any Parquet file or directory, local or behind a ``pyarrow.fs`` URI (``s3://``,
  ``gs://``, ``hdfs://``, ``file://``).

Files are validated up front and every problem is reported at once in one
:class:`DataError` (duplicate ids, null owners, NaN features, labels out of range, ragged
feature vectors, ...), because a bad row found mid-training wastes a cluster.

:func:`split_train_test` decides a sample's side from ``(seed, sample_id)`` alone, so
deleting rows never moves another sample between train and test.

No Ray import here: this is plain numpy / pyarrow / pydantic / scikit-learn.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ray_unlearn.platform.core.storage import Storage, dataset_path

__all__ = [
    "BUNDLED",
    "DataConfig",
    "DataError",
    "Records",
    "SyntheticConfig",
    "bundled_name",
    "held_out_mask",
    "load_dataset",
    "make_digits",
    "make_synthetic",
    "read_records",
    "records_from_table",
    "split_train_test",
    "write_records",
]

#: Names of the bundled sources accepted by ``DataConfig.source``.
BUNDLED = ("digits", "synthetic")

SAMPLE_ID = "sample_id"
OWNER_ID = "owner_id"
FEATURES = "features"

# Parquet schema metadata written by :meth:`Records.to_table`; read back when the config
# leaves ``num_classes`` / ``feature_shape`` unset, so a round trip keeps both.
_META_NUM_CLASSES = b"ray_unlearn.num_classes"
_META_FEATURE_SHAPE = b"ray_unlearn.feature_shape"
# Version of the generator that produced a bundled file; a cached file with another tag is
# regenerated (so changing a generator never silently reuses stale data).
_META_GENERATOR = b"ray_unlearn.generator"
_DIGITS_GENERATOR = "digits-v1"
_SYNTHETIC_GENERATOR = "synthetic-v1"

_MAX_EXAMPLES = 5
_SOURCE_HELP = (
    "data.source must be 'digits', 'synthetic', or a Parquet file/directory given as a local "
    "path or a pyarrow.fs URI (s3://bucket/key.parquet, gs://..., hdfs://..., file:///...)"
)


class DataError(ValueError):
    """A dataset problem: the message names the input, the offending ids/values and what
    is allowed. ``problems`` holds one line per problem when several were found at once."""

    def __init__(self, message: str, problems: Sequence[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


def _examples(values: Sequence[Any] | np.ndarray, k: int = _MAX_EXAMPLES) -> str:
    """``"3, 7, 9 (and 12 more)"``: at most ``k`` examples of a long list."""
    values = list(values)
    shown = ", ".join(str(v.item() if isinstance(v, np.generic) else v) for v in values[:k])
    return shown + (f" (and {len(values) - k} more)" if len(values) > k else "")


def _raise_problems(source: str, problems: list[str]) -> None:
    if problems:
        lines = [f"invalid dataset {source}: {len(problems)} problem(s)"]
        lines += [f"  - {p}" for p in problems]
        raise DataError("\n".join(lines), problems)


# -- records -----------------------------------------------------------------------------


@dataclass(eq=False)
class Records:
    """Samples in memory, one row each; all arrays share the row order.

    Treat the arrays as read-only (``subset`` copies); :meth:`index_of` caches a lookup.

    Attributes:
        sample_ids: int64, shape (N,), unique.
        owner_ids: str, shape (N,): the person who can ask for the row's deletion.
        labels: int64, shape (N,), each in ``[0, num_classes)``.
        features: float32, shape (N, D), C-contiguous (flat per sample).
        num_classes: number of classes the model predicts (may exceed ``labels.max() + 1``).
        feature_shape: per-sample shape the model sees, e.g. ``(64,)`` or ``(1, 8, 8)``;
            its product is D.
    """

    sample_ids: np.ndarray
    owner_ids: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    num_classes: int
    feature_shape: tuple[int, ...]
    _lookup: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.sample_ids = np.ascontiguousarray(self.sample_ids, dtype=np.int64).reshape(-1)
        owners = np.asarray(self.owner_ids)
        if owners.dtype.kind not in ("U", "O"):
            owners = owners.astype(str)
        self.owner_ids = owners.reshape(-1)
        self.labels = np.ascontiguousarray(self.labels, dtype=np.int64).reshape(-1)
        n = len(self.sample_ids)
        self.num_classes = int(self.num_classes)
        self.feature_shape = tuple(int(s) for s in self.feature_shape)
        feats = np.asarray(self.features, dtype=np.float32)
        if feats.ndim > 2 or (feats.ndim == 1 and feats.size == 0):  # (N, *shape) or empty
            feats = feats.reshape(len(feats) if feats.ndim > 2 else 0, -1)
            if feats.shape[1] == 0:
                feats = feats.reshape(0, math.prod(self.feature_shape))
        self.features = np.ascontiguousarray(feats)
        problems = []
        if not (len(self.owner_ids) == len(self.labels) == n == len(self.features)):
            problems.append(
                f"row counts differ: sample_ids {n}, owner_ids {len(self.owner_ids)}, "
                f"labels {len(self.labels)}, features {len(self.features)}"
            )
        if self.features.ndim != 2:
            problems.append(f"features must be 2-D (N, D), got shape {self.features.shape}")
        elif math.prod(self.feature_shape) != self.features.shape[1]:
            problems.append(
                f"feature_shape {self.feature_shape} has {math.prod(self.feature_shape)} "
                f"values, but each sample has D={self.features.shape[1]} features"
            )
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        elif len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            bad = (self.labels < 0) | (self.labels >= self.num_classes)
            problems.append(
                f"labels must be in [0, {self.num_classes}); got {_examples(self.labels[bad])}"
            )
        _raise_problems("(Records)", problems)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __repr__(self) -> str:
        return (
            f"Records(n={len(self)}, owners={len(np.unique(self.owner_ids))}, "
            f"num_classes={self.num_classes}, feature_shape={self.feature_shape})"
        )

    @property
    def num_features(self) -> int:
        """D: features per sample (the product of ``feature_shape``)."""
        return int(self.features.shape[1])

    @property
    def shaped_features(self) -> np.ndarray:
        """Features as ``(N, *feature_shape)`` (a view, no copy)."""
        return self.features.reshape((len(self), *self.feature_shape))

    def subset(self, index_or_mask: Any) -> Records:
        """Rows selected by a boolean mask of length N, integer positions, or a slice (copy)."""
        if isinstance(index_or_mask, slice):
            idx = np.arange(len(self))[index_or_mask]
        else:
            idx = np.asarray(index_or_mask)
            if idx.dtype == bool:
                if idx.shape != (len(self),):
                    raise DataError(
                        f"subset mask has shape {idx.shape}; a boolean mask must have shape "
                        f"({len(self)},)"
                    )
                idx = np.flatnonzero(idx)
            elif idx.size == 0:
                idx = idx.astype(np.int64)
            elif idx.dtype.kind not in "iu":
                raise DataError(
                    f"subset takes a boolean mask or integer positions, got {idx.dtype}"
                )
            idx = idx.reshape(-1)
            out = (idx >= len(self)) | (idx < -len(self))
            if out.any():
                raise DataError(
                    f"subset positions out of range for {len(self)} rows: {_examples(idx[out])}"
                )
        return Records(
            sample_ids=self.sample_ids[idx],
            owner_ids=self.owner_ids[idx],
            labels=self.labels[idx],
            features=self.features[idx],
            num_classes=self.num_classes,
            feature_shape=self.feature_shape,
        )

    def index_of(self, sample_ids: Any) -> np.ndarray:
        """Row positions (int64, same order as given) of ``sample_ids``.

        Raises :class:`DataError` listing ids that are not in these records.
        """
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        if self._lookup is None:
            order = np.argsort(self.sample_ids, kind="stable")
            self._lookup = (self.sample_ids[order], order)
        sorted_ids, order = self._lookup
        if len(sorted_ids) == 0:
            pos = np.zeros(len(ids), dtype=np.int64)
            missing = np.ones(len(ids), dtype=bool)
        else:
            pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
            missing = sorted_ids[pos] != ids
        if missing.any():
            unknown = np.unique(ids[missing])
            raise DataError(
                f"unknown sample ids ({len(unknown)}): {_examples(unknown)}; "
                f"known ids are the {len(self)} sample_id values of this dataset"
            )
        return order[pos].astype(np.int64)

    def sample_ids_of_owners(self, owner_ids: Any) -> np.ndarray:
        """Sorted sample ids of every row owned by ``owner_ids``; unknown owners raise."""
        wanted = np.asarray([str(o) for o in np.atleast_1d(np.asarray(owner_ids, dtype=object))])
        known = np.isin(wanted, self.owner_ids)
        if not known.all():
            unknown = sorted(set(wanted[~known].tolist()))
            raise DataError(f"unknown owner ids ({len(unknown)}): {_examples(unknown)}")
        return np.sort(self.sample_ids[np.isin(self.owner_ids, wanted)])

    def to_table(self) -> pa.Table:
        """Arrow table: ``sample_id`` int64, ``owner_id`` string, ``label`` int64,
        ``features`` fixed_size_list<float32>[D]; num_classes and feature_shape go into the
        schema metadata so :func:`read_records` restores them."""
        flat = pa.array(self.features.reshape(-1), type=pa.float32())
        table = pa.table(
            {
                SAMPLE_ID: pa.array(self.sample_ids, type=pa.int64()),
                OWNER_ID: pa.array(self.owner_ids.astype(str).tolist(), type=pa.string()),
                "label": pa.array(self.labels, type=pa.int64()),
                FEATURES: pa.FixedSizeListArray.from_arrays(flat, self.num_features),
            }
        )
        return table.replace_schema_metadata(
            {
                _META_NUM_CLASSES: str(self.num_classes).encode(),
                _META_FEATURE_SHAPE: json.dumps(list(self.feature_shape)).encode(),
            }
        )


# -- configuration -----------------------------------------------------------------------


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


class DataConfig(BaseModel):
    """Where the records come from and how to read and split them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    source: str = Field(
        "digits",
        description="'digits', 'synthetic', or a Parquet file/directory (local path or "
        "pyarrow.fs URI such as s3://bucket/key.parquet).",
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    samples_per_owner: float = Field(
        4.0, ge=1.0, description="digits: mean samples per owner (sizes vary, at least 1 each)."
    )
    label_column: str = Field("label", min_length=1, description="Integer class column.")
    features_column: str | None = Field(
        None,
        description="A list<number> column; None: 'features' if present, else every numeric "
        "column other than sample_id / owner_id / the label.",
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
    seed: int = Field(0, ge=0, description="Seed of the digits owner assignment and the split.")
    compact: Literal["on_delete", "manual"] = Field(
        "on_delete",
        description="When the run's own copy of the data drops deleted rows: 'on_delete' (as "
        "each deletion is done) or 'manual' (`ray-unlearn compact --run ID`; the audit lists "
        "what waits).",
    )

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError(f"must not be empty; {_SOURCE_HELP}")
        looks_like_path = "/" in v or "." in v or os.sep in v or "://" in v
        if v not in BUNDLED and not looks_like_path:
            raise ValueError(
                f"unknown bundled dataset {v!r}; {_SOURCE_HELP} (write ./{v} for a local "
                "directory of that name)"
            )
        return v

    @field_validator("feature_shape")
    @classmethod
    def _shape(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(s < 1 for s in v)):
            raise ValueError(f"must be a non-empty list of positive sizes, e.g. [1, 8, 8]; got {v}")
        return v

    @field_validator("features_column")
    @classmethod
    def _features_column(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a column name or null")
        return v


# -- reading Parquet ---------------------------------------------------------------------


def _resolve(uri_or_path: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any URI ``pyarrow.fs`` understands."""
    s = str(uri_or_path)
    if "://" in s:
        try:
            return pafs.FileSystem.from_uri(s)
        except (pa.ArrowException, ValueError, OSError) as e:
            raise DataError(f"cannot open {s}: {e}; {_SOURCE_HELP}") from e
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(s))


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name).combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    return col


def _read_metadata(table: pa.Table) -> dict[bytes, bytes]:
    return dict(table.schema.metadata or {})


def _records_from_table(
    table: pa.Table,
    source: str,
    *,
    label_column: str = "label",
    features_column: str | None = None,
    num_classes: int | None = None,
    feature_shape: Sequence[int] | None = None,
) -> Records:
    """Validate an Arrow table and build :class:`Records`, sorted by sample id.

    Collects every problem before raising one :class:`DataError`.
    """
    names = table.column_names
    problems: list[str] = []
    have = f"columns present: {', '.join(names) if names else '(none)'}"

    if table.num_rows == 0:
        problems.append(f"the dataset is empty (0 rows; {have}); at least one row is needed")
        _raise_problems(source, problems)

    missing = [c for c in (SAMPLE_ID, OWNER_ID, label_column) if c not in names]
    if features_column is not None and features_column not in names:
        missing.append(features_column)
    if missing:
        problems.append(
            f"missing column(s) {', '.join(repr(m) for m in missing)}; {have}. Required: "
            f"{SAMPLE_ID!r} (integer), {OWNER_ID!r} (string), the label column "
            f"{label_column!r} (integer) and features (data.features_column, a {FEATURES!r} "
            "list column, or numeric columns)"
        )

    # sample ids: integer, non-null, unique. Later messages name rows by sample id if valid.
    ids: np.ndarray | None = None
    if SAMPLE_ID in names:
        col = _column(table, SAMPLE_ID)
        if not pa.types.is_integer(col.type):
            problems.append(f"column {SAMPLE_ID!r} must be integer, got {col.type}")
        elif col.null_count:
            rows = np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))
            problems.append(
                f"column {SAMPLE_ID!r} has {col.null_count} null(s) at rows {_examples(rows)}"
            )
        else:
            try:
                ids = col.cast(pa.int64()).to_numpy()
            except pa.ArrowInvalid:
                problems.append(f"column {SAMPLE_ID!r} has values beyond the int64 range")
            if ids is not None:
                uniq, counts = np.unique(ids, return_counts=True)
                dup = uniq[counts > 1]
                if len(dup):
                    problems.append(
                        f"duplicate sample ids ({len(dup)} ids repeated): {_examples(dup)}; "
                        f"{SAMPLE_ID!r} must be unique"
                    )

    def where(mask: np.ndarray) -> str:
        rows = np.flatnonzero(mask)
        if ids is not None:
            return f"sample_id {_examples(ids[rows])}"
        return f"rows {_examples(rows)}"

    # owner ids: strings (integers converted), non-null.
    owners: np.ndarray | None = None
    if OWNER_ID in names:
        col = _column(table, OWNER_ID)
        if pa.types.is_integer(col.type):
            col = col.cast(pa.string())
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            problems.append(f"column {OWNER_ID!r} must be string (or integer), got {col.type}")
        elif col.null_count:
            mask = col.is_null().to_numpy(zero_copy_only=False)
            problems.append(
                f"column {OWNER_ID!r} has {col.null_count} null owner id(s) at {where(mask)}; "
                "every sample needs an owner"
            )
        else:
            owners = np.asarray(col.to_numpy(zero_copy_only=False), dtype=str)

    # labels: integer-valued, non-null (range checked once num_classes is known).
    labels: np.ndarray | None = None
    if label_column in names:
        col = _column(table, label_column)
        if col.null_count:
            mask = col.is_null().to_numpy(zero_copy_only=False)
            problems.append(
                f"label column {label_column!r} has {col.null_count} null(s) at {where(mask)}"
            )
        elif pa.types.is_integer(col.type):
            try:
                labels = col.cast(pa.int64()).to_numpy()
            except pa.ArrowInvalid:
                problems.append(f"label column {label_column!r} has values beyond the int64 range")
        elif pa.types.is_floating(col.type):
            vals = col.to_numpy(zero_copy_only=False).astype(np.float64)
            bad = ~np.isfinite(vals) | (vals != np.round(vals))
            if bad.any():
                problems.append(
                    f"label column {label_column!r} has non-integer labels at {where(bad)} "
                    f"(values {_examples(vals[bad])}); labels must be integer class indices"
                )
            else:
                labels = vals.astype(np.int64)
        else:
            problems.append(
                f"label column {label_column!r} must hold integer class indices, got {col.type}"
            )

    # features: one list column, or numeric columns.
    feats: np.ndarray | None = None
    feat_name = features_column
    if feat_name is None and FEATURES in names:
        feat_name = FEATURES
    if feat_name is not None and feat_name in names:
        col = _column(table, feat_name)
        if not _is_list(col.type) or not _is_numeric(col.type.value_type):
            problems.append(
                f"features column {feat_name!r} must be a list of numbers "
                f"(list<float>, fixed_size_list<float>), got {col.type}"
            )
        elif col.null_count:
            mask = col.is_null().to_numpy(zero_copy_only=False)
            problems.append(f"features column {feat_name!r} has null rows at {where(mask)}")
        else:
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
            values, counts = np.unique(lengths, return_counts=True)
            d = int(values[np.argmax(counts)])
            if len(values) > 1:
                bad = lengths != d
                problems.append(
                    f"features column {feat_name!r} is ragged: most rows have {d} values, but "
                    f"{int(bad.sum())} row(s) differ ({where(bad)}; lengths "
                    f"{_examples(lengths[bad])}); every row needs the same length"
                )
            elif d == 0:
                problems.append(f"features column {feat_name!r} has empty vectors (length 0)")
            else:
                flat = col.flatten()
                if flat.null_count:
                    rows = np.flatnonzero(
                        flat.is_null().to_numpy(zero_copy_only=False).reshape(-1, d).any(axis=1)
                    )
                    mask = np.zeros(len(col), dtype=bool)
                    mask[rows] = True
                    problems.append(
                        f"features column {feat_name!r} has null values inside rows at {where(mask)}"
                    )
                else:
                    feats = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)
    elif feat_name is None:
        used = {SAMPLE_ID, OWNER_ID, label_column}
        cols = [
            c
            for c in names
            if c not in used
            and not c.startswith("__index_level_")
            and _is_numeric(table.schema.field(c).type)
        ]
        if not cols:
            lists = [c for c in names if _is_list(table.schema.field(c).type)]
            hint = f" (list columns here: {', '.join(lists)})" if lists else ""
            problems.append(
                f"no features found: no {FEATURES!r} list column and no numeric columns besides "
                f"{SAMPLE_ID!r}, {OWNER_ID!r} and {label_column!r}; {have}. Set "
                f"data.features_column to a list<float> column{hint}"
            )
        else:
            nulls = [c for c in cols if table.column(c).null_count]
            for c in nulls:
                mask = _column(table, c).is_null().to_numpy(zero_copy_only=False)
                problems.append(f"feature column {c!r} has nulls at {where(mask)}")
            if not nulls:
                feats = np.empty((table.num_rows, len(cols)), dtype=np.float32)
                for j, c in enumerate(cols):
                    feats[:, j] = _column(table, c).to_numpy(zero_copy_only=False)

    if feats is not None:
        finite = np.isfinite(feats).all(axis=1)
        if not finite.all():
            problems.append(
                f"features contain NaN or inf in {int((~finite).sum())} row(s) at {where(~finite)}; "
                "features must be finite (float32 range)"
            )

    # num_classes: config, else file metadata, else max label + 1.
    meta = _read_metadata(table)
    k_source = "data.num_classes"
    if num_classes is None and _META_NUM_CLASSES in meta:
        try:
            num_classes = int(meta[_META_NUM_CLASSES])
            k_source = "the file's metadata"
        except ValueError:
            num_classes = None
    if labels is not None:
        if num_classes is None:
            num_classes = max(int(labels.max()) + 1, 2)
            k_source = "max label + 1"
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            problems.append(
                f"labels out of range at {where(bad)} (values {_examples(labels[bad])}); "
                f"labels must be in [0, {num_classes}) with num_classes={num_classes} "
                f"(from {k_source})"
            )

    # feature_shape: config, else metadata (when it fits), else (D,).
    shape: tuple[int, ...] | None = None
    if feats is not None:
        d = feats.shape[1]
        if feature_shape is not None:
            shape = tuple(int(s) for s in feature_shape)
            if math.prod(shape) != d:
                problems.append(
                    f"feature_shape {list(shape)} has {math.prod(shape)} values, but each sample "
                    f"has D={d} features; the product of feature_shape must equal D"
                )
        elif _META_FEATURE_SHAPE in meta:
            try:
                shape = tuple(int(s) for s in json.loads(meta[_META_FEATURE_SHAPE]))
            except (ValueError, TypeError):
                shape = None
            if shape is None or math.prod(shape) != d:
                shape = (d,)
        else:
            shape = (d,)

    _raise_problems(source, problems)
    assert ids is not None and owners is not None and labels is not None and feats is not None
    assert num_classes is not None and shape is not None
    order = np.argsort(ids, kind="stable")
    if np.all(order == np.arange(len(order))):
        return Records(ids, owners, labels, feats, num_classes, shape)
    return Records(ids[order], owners[order], labels[order], feats[order], num_classes, shape)


def read_records(uri_or_path: str | os.PathLike[str], cfg: DataConfig | None = None) -> Records:
    """Read and validate a Parquet file or directory (local path or ``pyarrow.fs`` URI).

    Expected columns: ``sample_id`` (integer, unique), ``owner_id`` (string; integers are
    converted), ``cfg.label_column`` (integer class index), and the features: the
    ``cfg.features_column`` list column, else a ``features`` list column, else every numeric
    column other than those three. Rows come back sorted by sample id. All problems found
    are reported together in one :class:`DataError`.
    """
    cfg = cfg or DataConfig()
    source = str(uri_or_path)
    fs, path = _resolve(source)
    try:
        info = fs.get_file_info(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot access {source}: {e}; {_SOURCE_HELP}") from e
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"no file or directory at {source}; {_SOURCE_HELP}")
    try:
        table = pq.read_table(path, filesystem=fs)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read {source} as Parquet: {e}; {_SOURCE_HELP}") from e
    return _records_from_table(
        table,
        source,
        label_column=cfg.label_column,
        features_column=cfg.features_column,
        num_classes=cfg.num_classes,
        feature_shape=cfg.feature_shape,
    )


def records_from_table(table: pa.Table, source: str, cfg: DataConfig) -> Records:
    """Validate a table written by :meth:`Records.to_table` (e.g. a run's own copy)."""
    return _records_from_table(
        table,
        source,
        label_column="label",  # to_table's name, whatever the source called it
        features_column=None,
        num_classes=cfg.num_classes,
        feature_shape=cfg.feature_shape,
    )


def write_records(records: Records, uri_or_path: str | os.PathLike[str]) -> None:
    """Write ``records`` as one Parquet file (local path or ``pyarrow.fs`` URI), atomically:
    readers see the old file or the whole new one. Parent folders are created."""
    s = str(uri_or_path)
    if "://" in s:
        parent, _, name = s.rstrip("/").rpartition("/")
        if not name or parent.endswith(":/") or parent.endswith(":"):
            raise DataError(f"cannot write to {s}: the URI must name a file under a bucket/folder")
    else:
        parent, name = os.path.split(os.path.abspath(os.path.expanduser(s)))
    Storage(parent).write_table(name, records.to_table())


# -- bundled datasets --------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:g}"


def _owners(n: int, samples_per_owner: float, rng: np.random.Generator) -> np.ndarray:
    """Owner ids ``owner-00042`` for ``n`` samples, in a seeded random grouping.

    Sizes are ``1 + Poisson(samples_per_owner - 1)`` (mean ``samples_per_owner``, at
    least 1), trimmed to add up to ``n``; samples are dealt to owners in a random order.
    """
    sizes = 1 + rng.poisson(samples_per_owner - 1.0, size=n)
    ends = np.cumsum(sizes)
    n_owners = int(np.searchsorted(ends, n)) + 1
    sizes = sizes[:n_owners]
    sizes[-1] -= int(ends[n_owners - 1]) - n
    owner_of = np.empty(n, dtype=np.int64)
    owner_of[rng.permutation(n)] = np.repeat(np.arange(n_owners), sizes)
    width = max(5, len(str(n_owners - 1)))
    return np.char.add("owner-", np.char.zfill(owner_of.astype(str), width))


def _table(
    features: np.ndarray,
    labels: np.ndarray,
    owners: np.ndarray,
    num_classes: int,
    feature_shape: tuple[int, ...],
    generator: str,
) -> pa.Table:
    rec = Records(np.arange(len(labels)), owners, labels, features, num_classes, feature_shape)
    table = rec.to_table()
    meta = dict(table.schema.metadata)
    meta[_META_GENERATOR] = generator.encode()
    return table.replace_schema_metadata(meta)


def make_digits(samples_per_owner: float = 4.0, seed: int = 0) -> pa.Table:
    """scikit-learn's digits (1797 8x8 images, 10 classes; bundled, no download) as a table.

    Features are pixel intensities scaled from 0..16 to [0, 1]; feature_shape (1, 8, 8).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    feats = (np.asarray(d.data, dtype=np.float32) / 16.0).reshape(len(d.target), -1)
    rng = np.random.default_rng([seed, 2])
    owners = _owners(len(d.target), samples_per_owner, rng)
    return _table(feats, d.target, owners, 10, (1, 8, 8), _DIGITS_GENERATOR)


def _purchase(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Purchase-100-like data: binary "bought item j" vectors, one class per customer type.

    Each class c has a prototype P[c] of per-item purchase probabilities: a low base rate
    (0.05), a shared set of items for its group of ~10 related classes (probabilities
    0.2-0.5; the groups make classes confusable) and its own ~5% of the items (0.15-0.4).
    Each customer scales the probabilities by an activity level ~ Gamma(4, 1/4) (mean 1).
    An MLP 600-256-100 reaches about 80% test accuracy with 20k samples (and fits the
    training set), like the real benchmark.
    """
    n, d, c = cfg.n_samples, cfg.features, cfg.classes
    k_class = max(1, round(d * 30 / 600))
    k_group = max(1, round(d * 40 / 600))
    n_groups = max(1, c // 10)
    probs = np.full((c, d), 0.05, dtype=np.float32)
    group_items = np.argsort(rng.random((n_groups, d)), axis=1)[:, :k_group]
    group_probs = np.zeros((n_groups, d), dtype=np.float32)
    np.put_along_axis(
        group_probs, group_items, rng.uniform(0.2, 0.5, (n_groups, k_group)).astype(np.float32), 1
    )
    group_of = rng.integers(0, n_groups, c)
    probs = np.maximum(probs, group_probs[group_of])
    class_items = np.argsort(rng.random((c, d)), axis=1)[:, :k_class]
    own = rng.uniform(0.15, 0.4, (c, k_class)).astype(np.float32)
    np.put_along_axis(
        probs, class_items, np.maximum(np.take_along_axis(probs, class_items, 1), own), 1
    )

    labels = rng.integers(0, c, n)
    labels[rng.permutation(n)[:c]] = np.arange(c)  # every class present
    activity = rng.gamma(4.0, 0.25, n).astype(np.float32)
    feats = np.empty((n, d), dtype=np.float32)
    chunk = max(1, (1 << 22) // d)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        p = probs[labels[s:e]]
        p *= activity[s:e, None]
        feats[s:e] = rng.random((e - s, d), dtype=np.float32) < p
    return feats, labels


def _blobs(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes: unit-variance noise around class means spaced ~3 std apart."""
    n, d, c = cfg.n_samples, cfg.features, cfg.classes
    means = rng.standard_normal((c, d)).astype(np.float32) * np.float32(2.2 / math.sqrt(d))
    labels = rng.integers(0, c, n)
    labels[rng.permutation(n)[:c]] = np.arange(c)
    feats = means[labels] + rng.standard_normal((n, d), dtype=np.float32)
    return feats, labels


def make_synthetic(cfg: SyntheticConfig) -> pa.Table:
    """Generate the configured synthetic dataset as a table (deterministic in ``cfg``)."""
    rng = np.random.default_rng([cfg.seed, 0])
    feats, labels = (_purchase if cfg.preset == "purchase" else _blobs)(cfg, rng)
    owners = _owners(cfg.n_samples, cfg.samples_per_owner, np.random.default_rng([cfg.seed, 1]))
    return _table(feats, labels, owners, cfg.classes, (cfg.features,), _SYNTHETIC_GENERATOR)


def bundled_name(cfg: DataConfig) -> str:
    """Dataset name under ``datasets/``; it names every parameter that changes the data."""
    if cfg.source == "digits":
        return f"digits-spo{_fmt(cfg.samples_per_owner)}-s{cfg.seed}"
    if cfg.source == "synthetic":
        s = cfg.synthetic
        return (
            f"synthetic-{s.preset}-n{s.n_samples}-f{s.features}-c{s.classes}"
            f"-spo{_fmt(s.samples_per_owner)}-s{s.seed}"
        )
    raise DataError(f"{cfg.source!r} is not a bundled dataset; bundled: {', '.join(BUNDLED)}")


def load_dataset(cfg: DataConfig, storage: Storage) -> Records:
    """The configured dataset as :class:`Records`, sorted by sample id.

    Bundled sources are generated on first use and stored as
    ``datasets/<bundled_name>.parquet`` under ``storage``; later calls (any process) read
    that file. Other sources are read with :func:`read_records`.
    """
    if cfg.source not in BUNDLED:
        return read_records(cfg.source, cfg)
    rel = dataset_path(bundled_name(cfg))
    generator = _DIGITS_GENERATOR if cfg.source == "digits" else _SYNTHETIC_GENERATOR
    table = storage.read_table(rel) if storage.exists(rel) else None
    if table is None or _read_metadata(table).get(_META_GENERATOR) != generator.encode():
        if cfg.source == "digits":
            table = make_digits(cfg.samples_per_owner, cfg.seed)
        else:
            table = make_synthetic(cfg.synthetic)
        storage.write_table(rel, table)
    return _records_from_table(
        table,
        f"{storage.uri.rstrip('/')}/{rel}",
        num_classes=cfg.num_classes,
        feature_shape=cfg.feature_shape,
    )


# -- split -------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def held_out_mask(sample_ids: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """True where a sample is held out: ``hash(seed, sample_id) < test_fraction``.

    Depends on nothing but ``(seed, sample_id)``, so a sample never changes sides when
    other rows are added or deleted.
    """
    ids = np.ascontiguousarray(sample_ids, dtype=np.int64).view(np.uint64)
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    u = (_splitmix64(ids ^ key) >> np.uint64(11)).astype(np.float64) * (2.0**-53)
    return u < test_fraction


def split_train_test(records: Records, test_fraction: float, seed: int) -> tuple[Records, Records]:
    """(train, test), each sorted by sample id; a sample's side depends only on
    ``(seed, sample_id)`` (see :func:`held_out_mask`), about ``test_fraction`` of rows in test.

    Raises :class:`DataError` if ``test_fraction`` is outside [0, 1) or the train side
    would be empty.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    order = np.argsort(records.sample_ids, kind="stable")
    held = held_out_mask(records.sample_ids[order], test_fraction, seed)
    if len(records) and held.all():
        raise DataError(
            f"the train split is empty: all {len(records)} samples hashed to test "
            f"(test_fraction={test_fraction}, seed={seed}); use more data or a smaller fraction"
        )
    return records.subset(order[~held]), records.subset(order[held])
