"""Residue scan: does any file under a run still hold a deleted sample's id or its row?

A second implementation on purpose: it reads no registry, manifest list or contributions
index through the store's own code; it walks every file under ``runs/<id>/`` and looks at
bytes and decoded contents. What it looks for, for every sample whose deletion is *done*:

* ids in id-bearing places: Parquet columns named like sample ids (``sample_id``,
  ``sample_ids``, ``ids``, ...), JSON values under such keys, integer safetensors tensors
  whose name says ids (``batch.ids``);
* the row itself: the float32 little-endian bytes of each deleted row's features anywhere in
  a file's raw bytes, and each row of a decoded Parquet float list column (compressed
  Parquet hides raw bytes, so both are needed).

Evidence that must keep ids is allow-listed and reported as such, never scanned: the
deletion log (``deletions/``), the partition plan (``plan.parquet``) and, for versions whose
own manifest says ``retired``, that manifest and its sample list (what the retired model
was trained on: the proof of what was removed).

Rows whose bytes are one repeated value (e.g. all zeros) would match any run of that value
and are counted as ``unscannable_rows``, not searched; so are rows equal to a row the run
keeps (duplicates in the data: ``rows_equal_to_retained_rows``). Rows no longer held anywhere the
scanner can read (the user erased the source) are counted the same way.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_unlearn.platform.core.compaction import has_copy, read_copy
from ray_unlearn.platform.core.data import (
    BUNDLED,
    SAMPLE_ID,
    Records,
    read_records,
    records_from_table,
)
from ray_unlearn.platform.core.data.bundled import bundled_table

if TYPE_CHECKING:
    from ray_unlearn.platform.core.run import RunContext

# column / key / tensor names that hold sample ids (owner, request and version ids do not)
_ID_NAME = re.compile(r"(^|[._])(sample_ids?|ids)$")
_INT_DTYPES = {"I64": np.int64, "I32": np.int32}


def _evidence(run_root: str, files: list[str], read) -> dict[str, str]:
    """file -> why it may keep ids (relative paths under the storage root)."""
    out = {}
    for rel in files:
        sub = rel[len(run_root) + 1 :]
        if sub.startswith("deletions/"):
            out[rel] = "deletion log"
        elif sub == "plan.parquet":
            out[rel] = "partition plan"
    for rel in files:
        sub = rel[len(run_root) + 1 :]
        if sub.startswith("models/") and sub.endswith("/manifest.json"):
            try:
                state = json.loads(read(rel)).get("state")
            except (ValueError, OSError):
                continue
            if state == "retired":
                vdir = rel.rsplit("/", 1)[0]
                out[rel] = "retired version's manifest"
                out[f"{vdir}/samples.parquet"] = "retired version's sample list"
    return {k: v for k, v in out.items() if k in set(files)}


def _run_files(ctx: RunContext) -> list[str]:
    storage = ctx.storage
    sel = pafs.FileSelector(storage.full(ctx.layout.root), allow_not_found=True, recursive=True)
    base = storage.full("").rstrip("/")
    return sorted(
        i.path[len(base) :].lstrip("/")
        for i in storage.fs.get_file_info(sel)
        if i.type == pafs.FileType.File
    )


def _source_records(ctx: RunContext) -> Records | None:
    """The run's rows as the source outside the run holds them (without writing anything)."""
    cfg = ctx.config.data
    try:
        if cfg.source == "bbcnews" or cfg.text_column is not None:  # tokenised by the model
            return _text_source(ctx)
        if cfg.source in BUNDLED:
            return records_from_table(bundled_table(cfg), cfg.source, cfg)
        return read_records(cfg.source, cfg)
    except (ValueError, OSError):
        return None


def _text_source(ctx: RunContext) -> Records:
    from ray_unlearn.platform.core.data.parquet import _records_from_table
    from ray_unlearn.platform.core.data.text import TEXT, make_bbcnews
    from ray_unlearn.platform.core.models import text_encoder_of

    cfg, encode = ctx.config.data, text_encoder_of(ctx.config.model)
    if cfg.source != "bbcnews":
        return read_records(cfg.source, cfg, encode)
    return _records_from_table(
        make_bbcnews(), "bbcnews", num_classes=cfg.num_classes, text_column=TEXT, encode_text=encode
    )


def deleted_rows(ctx: RunContext, deleted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 (n, D) features) of the deleted rows the scanner can still read: from
    the run's copy where not yet compacted, else the source outside the run."""
    found_ids, found = [], []
    if has_copy(ctx.storage, ctx.layout):
        t = read_copy(ctx.storage, ctx.layout)
        ids = t[SAMPLE_ID].to_numpy()
        hit = np.isin(ids, deleted)
        feats = _float_matrix(t.column("features")) if "features" in t.column_names else None
        if hit.any() and feats is not None:
            found_ids.append(ids[hit])
            found.append(feats[hit])
    rest = deleted[~np.isin(deleted, np.concatenate(found_ids) if found_ids else [])]
    if len(rest):
        recs = _source_records(ctx)
        if recs is not None:
            have = rest[np.isin(rest, recs.sample_ids)]
            found_ids.append(have)
            found.append(recs.features[recs.index_of(have)])
    if not found_ids:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(found_ids), np.concatenate(found).astype("<f4")


def _retained_rows(ctx: RunContext, deleted: np.ndarray) -> set[bytes]:
    """The float32 bytes of every row the run's copy keeps (not deleted)."""
    if not has_copy(ctx.storage, ctx.layout):
        return set()
    t = read_copy(ctx.storage, ctx.layout)
    feats = _float_matrix(t.column("features")) if "features" in t.column_names else None
    if feats is None:
        return set()
    keep = ~np.isin(t[SAMPLE_ID].to_numpy(), deleted)
    return {r.tobytes() for r in feats[keep]}


def _float_matrix(col: pa.ChunkedArray) -> np.ndarray | None:
    """A (fixed size) list<float> column as float32 (rows, width); None if ragged/other."""
    arr = col.combine_chunks()
    if not (pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type)):
        return None
    if not pa.types.is_floating(arr.type.value_type) or arr.null_count:
        return None
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype("<f4")
    if len(arr) == 0 or len(flat) % len(arr):
        return None
    return flat.reshape(len(arr), -1)


def _json_ids(obj: Any, key: str = "") -> Iterable[int]:
    """Integers under sample-id keys, anywhere in a JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_ids(v, str(k))
    elif isinstance(obj, list):
        for v in obj:
            yield from _json_ids(v, key)
    elif isinstance(obj, int) and not isinstance(obj, bool) and _ID_NAME.search(key):
        yield obj


def _safetensors_ids(blob: bytes) -> np.ndarray:
    n = int.from_bytes(blob[:8], "little")
    try:
        header = json.loads(blob[8 : 8 + n])
    except ValueError:
        return np.zeros(0, np.int64)
    out = [np.zeros(0, np.int64)]
    for name, info in header.items():
        if name == "__metadata__" or info.get("dtype") not in _INT_DTYPES:
            continue
        if not _ID_NAME.search(name):
            continue
        start, end = (8 + n + o for o in info["data_offsets"])
        out.append(
            np.frombuffer(blob[start:end], dtype=_INT_DTYPES[info["dtype"]]).astype(np.int64)
        )
    return np.concatenate(out)


def scan_residue(ctx: RunContext) -> dict[str, Any]:
    """Scan every file under the run for done deletions' ids and rows (see the module doc).
    ``clean`` is True when nothing outside the allow-listed evidence was found."""
    storage = ctx.storage
    done = ctx.deletion_log.deleted_sample_ids()
    deleted = np.fromiter(sorted(done), np.int64, len(done))
    _, rows = deleted_rows(ctx, deleted)
    scannable = (
        np.array([len(np.unique(r)) > 1 for r in rows], bool) if len(rows) else np.zeros(0, bool)
    )
    # a deleted row equal to a retained one (duplicates in the data) cannot be told apart
    retained = _retained_rows(ctx, deleted)
    patterns = [b for b in (r.tobytes() for r in rows[scannable]) if b not in retained]
    ambiguous = int(scannable.sum()) - len(patterns)
    by_row = {p: i for i, p in enumerate(patterns)}
    width = rows.shape[1] if rows.ndim == 2 else 0
    files = _run_files(ctx)
    allowed = _evidence(ctx.layout.root, files, storage.read_bytes)
    finds: list[dict[str, Any]] = []
    seen_bytes = 0

    def find(rel: str, kind: str, count: int) -> None:
        if count:
            finds.append({"file": rel, "kind": kind, "count": int(count)})

    for rel in files:
        if rel in allowed or not len(deleted):
            continue
        blob = storage.read_bytes(rel)
        seen_bytes += len(blob)
        find(rel, "feature bytes", sum(blob.find(p) >= 0 for p in patterns))
        if rel.endswith(".parquet"):
            try:
                table = pq.read_table(io.BytesIO(blob))
            except (pa.ArrowException, OSError):
                continue
            for name in table.column_names:
                col = table.column(name)
                if _ID_NAME.search(name) and pa.types.is_integer(col.type):
                    find(rel, f"ids in column {name}", np.isin(col.to_numpy(), deleted).sum())
                mat = _float_matrix(col)
                if mat is not None and mat.shape[1] == width and patterns:
                    hits = sum(r.tobytes() in by_row for r in mat)
                    find(rel, f"rows in column {name}", hits)
        elif rel.endswith((".json", ".jsonl")):
            try:
                if rel.endswith(".json"):
                    docs = [json.loads(blob)]
                else:  # one document a line (journals)
                    docs = [json.loads(line) for line in blob.splitlines() if line.strip()]
            except ValueError:
                continue
            ids = np.fromiter((i for d in docs for i in _json_ids(d)), np.int64)
            find(rel, "ids in json", np.isin(ids, deleted).sum())
        elif rel.endswith(".safetensors"):
            find(rel, "ids in tensors", np.isin(_safetensors_ids(blob), deleted).sum())
    return {
        "run_id": ctx.run_id,
        "clean": not finds,
        "deleted_samples": len(deleted),
        "rows_scanned_for": len(patterns),
        "unscannable_rows": int(len(deleted) - len(patterns)),
        "rows_equal_to_retained_rows": ambiguous,
        "files_scanned": len(files) - len(allowed),
        "bytes_scanned": seen_bytes,
        "finds": finds,
        "allowed": [{"file": k, "why": v} for k, v in sorted(allowed.items())],
    }
