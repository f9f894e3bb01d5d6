"""Storage's Parquet tables: round trip, and no Python object inside Arrow's threads."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ray_unlearn.platform.core import storage as storage_mod
from ray_unlearn.platform.core.storage import Storage, StorageError


def test_tables_round_trip_through_arrow_native_files(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path))
    table = pa.table({"sample_id": np.arange(5, dtype=np.int64), "owner": list("abcde")})
    storage.write_table("a/t.parquet", table)
    seen = []
    real = storage_mod.pq.read_table

    def spy(source, *args, **kwargs):
        seen.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(storage_mod.pq, "read_table", spy)
    assert storage.read_table("a/t.parquet").equals(table)
    # Parquet's pre-buffering reads on Arrow's I/O threads; a buffer wrapping a Python
    # object (io.BytesIO, bytes) is freed on whichever thread drops it last, under the GIL,
    # and a worker taking the GIL while the interpreter exits aborts the process (exit 134).
    # An Arrow-native file keeps every buffer in Arrow's own memory.
    (source,) = seen
    assert isinstance(source, pa.NativeFile) and not isinstance(source, pa.PythonFile), source
    with pytest.raises(StorageError, match="no file 'a/missing.parquet'"):
        storage.read_table("a/missing.parquet")
