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

Modules: :mod:`.records` (the records table and its schema), :mod:`.config` (the config
section), :mod:`.parquet` (reading and validation), :mod:`.bundled` (generated sources and
:func:`load_dataset`), :mod:`.split` (train/test). Every public name is re-exported here.

No Ray import here: this is plain numpy / pyarrow / pydantic / scikit-learn. The names are
re-exported lazily (:func:`__getattr__`, PEP 562): the config section alone
(``DataConfig``, what config validation needs) must not pull numpy, pyarrow and
scikit-learn, so that a config typo is reported in a fraction of a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it (imported on first access)
_EXPORTS = {
    "bundled_name": "bundled",
    "load_dataset": "bundled",
    "make_digits": "bundled",
    "make_synthetic": "bundled",
    "BUNDLED": "config",
    "DataConfig": "config",
    "SyntheticConfig": "config",
    "read_records": "parquet",
    "records_from_table": "parquet",
    "write_records": "parquet",
    "FEATURES": "records",
    "OWNER_ID": "records",
    "SAMPLE_ID": "records",
    "DataError": "records",
    "Records": "records",
    "held_out_mask": "split",
    "split_train_test": "split",
}

__all__ = [  # the keys of _EXPORTS (tests/platform/core/test_data_lazy.py checks)
    "BUNDLED",
    "FEATURES",
    "OWNER_ID",
    "SAMPLE_ID",
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

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from ray_unlearn.platform.core.data.bundled import (
        bundled_name,
        load_dataset,
        make_digits,
        make_synthetic,
    )
    from ray_unlearn.platform.core.data.config import BUNDLED, DataConfig, SyntheticConfig
    from ray_unlearn.platform.core.data.parquet import (
        read_records,
        records_from_table,
        write_records,
    )
    from ray_unlearn.platform.core.data.records import (
        FEATURES,
        OWNER_ID,
        SAMPLE_ID,
        DataError,
        Records,
    )
    from ray_unlearn.platform.core.data.split import held_out_mask, split_train_test


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
