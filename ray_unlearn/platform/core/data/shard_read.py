"""Reading only some rows of a Parquet file, one row group at a time: how each Train worker
and shard actor loads its own shard from the run's copy of the data without ever holding
the rows of the shards it does not own.

The plan spreads owners over shards by hash, so every row group holds rows of every shard
and no min/max statistic can skip one (except for id ranges, which are tried first). What
bounds memory is reading one row group at a time: its ``sample_id`` column first, then,
only if it holds a wanted row, its other columns, filtered at once. Peak memory is then one
row group plus the rows kept, whatever the file's size; :func:`row_group_rows` keeps row
groups small (about :data:`ROW_GROUP_BYTES`) when the copy is written.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_unlearn.platform.core.data.records import SAMPLE_ID

ROW_GROUP_BYTES = 1 << 20  # 1 MiB of decoded columns per row group
_MIN_GROUP_ROWS = 128  # below that, per-group overhead (metadata, a read per column) dominates


def row_group_rows(table: pa.Table) -> int:
    """Rows per row group so that one group decodes to about :data:`ROW_GROUP_BYTES`."""
    per_row = table.nbytes / max(1, table.num_rows)
    return max(_MIN_GROUP_ROWS, int(ROW_GROUP_BYTES // max(per_row, 1.0)))


def _id_range(md: pq.FileMetaData, group: int, column: int) -> tuple[int, int] | None:
    stats = md.row_group(group).column(column).statistics
    if stats is None or not stats.has_min_max:
        return None
    return int(stats.min), int(stats.max)


def read_rows(source, sample_ids: np.ndarray) -> pa.Table:
    """The rows of ``source`` (an open Arrow file or a path) whose ``sample_id`` is in
    ``sample_ids``, in file order, with the file's schema and metadata. Reads one row group
    at a time and skips the columns of groups that hold none of them."""
    wanted = np.unique(np.asarray(sample_ids, dtype=np.int64))
    value_set = pa.array(wanted, type=pa.int64())
    pf = pq.ParquetFile(source)
    schema = pf.schema_arrow
    id_col = pf.schema.names.index(SAMPLE_ID) if SAMPLE_ID in pf.schema.names else None
    if id_col is None:
        raise ValueError(f"no {SAMPLE_ID!r} column to filter on; columns: {schema.names}")
    parts = []
    for g in range(pf.num_row_groups):
        rng = _id_range(pf.metadata, g, id_col)
        if rng is not None:  # no wanted id within [min, max]: skip without reading
            lo = np.searchsorted(wanted, rng[0], side="left")
            if lo == len(wanted) or wanted[lo] > rng[1]:
                continue
        ids = pf.read_row_group(g, columns=[SAMPLE_ID]).column(SAMPLE_ID)
        mask = pc.is_in(ids, value_set=value_set)
        if not pc.any(mask).as_py():
            continue
        parts.append(pf.read_row_group(g).filter(mask))
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    return table.replace_schema_metadata(schema.metadata)
