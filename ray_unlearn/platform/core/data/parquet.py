"""Reading and validating Parquet: a file or directory, local or behind a ``pyarrow.fs`` URI
(``s3://``, ``gs://``, ``hdfs://``, ``file://``), becomes :class:`Records`.

Files are validated up front and every problem is reported at once in one
:class:`DataError` (duplicate ids, null owners, NaN features, labels out of range, ragged
feature vectors, ...), because a bad row found mid-training wastes a cluster.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_unlearn.platform.core.data.columns import image_column, tensor_column
from ray_unlearn.platform.core.data.config import _SOURCE_HELP, DataConfig
from ray_unlearn.platform.core.data.records import (
    _META_FEATURE_SHAPE,
    _META_NUM_CLASSES,
    FEATURES,
    OWNER_ID,
    SAMPLE_ID,
    DataError,
    Records,
    _examples,
    _raise_problems,
)
from ray_unlearn.platform.core.data.text import TextEncoder, text_features
from ray_unlearn.platform.core.storage import Storage


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
    text_column: str | None = None,
    encode_text: TextEncoder | None = None,
    image: str | None = None,
    image_transform: str | None = None,
    image_transform_args: dict | None = None,
) -> Records:
    """Validate an Arrow table and build :class:`Records`, sorted by sample id.

    The features: the ``text_column``'s texts tokenised by ``encode_text`` (the model
    component's tokenizer; see :mod:`.text`), else the ``image`` column (encoded images,
    decoded by ``image_transform``), else the ``features_column`` / ``features`` tensor
    column, else numeric columns (:mod:`.columns`). Collects every problem before raising
    one :class:`DataError`.
    """
    names = table.column_names
    problems: list[str] = []
    have = f"columns present: {', '.join(names) if names else '(none)'}"

    if table.num_rows == 0:
        problems.append(f"the dataset is empty (0 rows; {have}); at least one row is needed")
        _raise_problems(source, problems)

    missing = [c for c in (SAMPLE_ID, OWNER_ID, label_column) if c not in names]
    for extra in (features_column, text_column, image):
        if extra is not None and extra not in names:
            missing.append(extra)
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

    # features: an image column, one tensor column, or numeric columns.
    feats: np.ndarray | None = None
    col_shape: tuple[int, ...] | None = None  # the column's own per-row shape, if it has one
    feat_name = features_column
    if feat_name is None and FEATURES in names:
        feat_name = FEATURES
    if text_column is not None:
        if text_column in names:
            feats = text_features(
                _column(table, text_column), text_column, encode_text, where, problems
            )
    elif image is not None:
        if image in names:
            feats, col_shape, found = image_column(
                _column(table, image), image, where, image_transform, image_transform_args or {}
            )
            problems += found
    elif feat_name is not None and feat_name in names:
        col = table.column(feat_name).combine_chunks()  # extension types stay as they are
        feats, col_shape, found = tensor_column(col, feat_name, where)
        problems += found
        if col_shape is not None and len(col_shape) == 1:
            col_shape = None  # a flat vector: the shape comes from config or metadata
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

    # feature_shape: config, else the column's own (image, n-D tensor), else metadata (when
    # it fits), else (D,).
    shape: tuple[int, ...] | None = None
    if feats is not None:
        d = feats.shape[1]
        if feature_shape is None and col_shape is not None:
            shape = col_shape
        elif feature_shape is not None:
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


def read_records(
    uri_or_path: str | os.PathLike[str],
    cfg: DataConfig | None = None,
    encode_text: TextEncoder | None = None,
) -> Records:
    """Read and validate a Parquet file or directory (local path or ``pyarrow.fs`` URI).

    Expected columns: ``sample_id`` (integer, unique), ``owner_id`` (string; integers are
    converted), ``cfg.label_column`` (integer class index), and the features: the
    ``cfg.features_column`` list column, else a ``features`` list column, else every numeric
    column other than those three, or the ``cfg.text_column`` texts tokenised by
    ``encode_text``. Rows come back sorted by sample id. All problems found
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
        text_column=cfg.text_column,
        encode_text=encode_text,
        image=cfg.image_column,
        image_transform=cfg.image_transform,
        image_transform_args=cfg.image_transform_args,
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
