"""The records table: samples in memory with their owner, label and features.

A :class:`Records` holds one row per sample (unique int64 ``sample_id``, string
``owner_id``, integer label, flat float32 features) and round-trips through an Arrow
table (:meth:`Records.to_table`) whose schema metadata keeps ``num_classes`` and
``feature_shape``. :class:`DataError` is the one error type of the data package: it
names the input, the offending ids or values and what is allowed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

SAMPLE_ID = "sample_id"
OWNER_ID = "owner_id"
FEATURES = "features"

# Parquet schema metadata written by :meth:`Records.to_table`; read back when the config
# leaves ``num_classes`` / ``feature_shape`` unset, so a round trip keeps both.
_META_NUM_CLASSES = b"ray_unlearn.num_classes"
_META_FEATURE_SHAPE = b"ray_unlearn.feature_shape"

_MAX_EXAMPLES = 5


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


def _writable(a: Any, dtype: type) -> np.ndarray:
    """``a`` as a C-contiguous writable ``dtype`` array: no copy unless it is not one."""
    return np.require(a, dtype, ["C", "W"])


# -- records -----------------------------------------------------------------------------


@dataclass(eq=False)
class Records:
    """Samples in memory, one row each; all arrays share the row order.

    Treat the arrays as read-only (``subset`` copies); :meth:`index_of` caches a lookup.
    They are writable all the same: a read-only input (an Arrow column's zero-copy view, a
    Ray object-store array) is copied once here, because torch, which shares their memory
    (``torch.from_numpy``), has no read-only tensors and warns on every such array.

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
        self.sample_ids = _writable(self.sample_ids, np.int64).reshape(-1)
        owners = np.asarray(self.owner_ids)
        if owners.dtype.kind not in ("U", "O"):
            owners = owners.astype(str)
        self.owner_ids = owners.reshape(-1)
        self.labels = _writable(self.labels, np.int64).reshape(-1)
        n = len(self.sample_ids)
        self.num_classes = int(self.num_classes)
        self.feature_shape = tuple(int(s) for s in self.feature_shape)
        feats = np.asarray(self.features, dtype=np.float32)
        if feats.ndim > 2 or (feats.ndim == 1 and feats.size == 0):  # (N, *shape) or empty
            feats = feats.reshape(len(feats) if feats.ndim > 2 else 0, -1)
            if feats.shape[1] == 0:
                feats = feats.reshape(0, math.prod(self.feature_shape))
        self.features = _writable(feats, np.float32)
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
