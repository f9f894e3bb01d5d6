"""One storage root for everything a run keeps: a local directory or any ``pyarrow.fs`` URI.

Every path a run uses is built by :class:`RunLayout`, so the on-disk shape lives in one
place. Writes are atomic (readers never see half a file) and, on a local disk, durable
(``fsync`` of the file and of its directory) before they return: the deletion log relies on
that to acknowledge a request only once it survives a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(RuntimeError):
    """A storage operation failed (missing file, exclusive create of an existing file)."""


class AlreadyExists(StorageError):
    """``write_bytes(..., exclusive=True)`` found the path already there."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: str) -> None:
    """``os.makedirs`` that also fsyncs the parent of every folder it creates: a new folder's
    own entry must survive a crash as much as the file written into it."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    _makedirs_durable(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    _fsync_dir(parent)


class Storage:
    """A filesystem rooted at ``root`` (local path or URI such as ``s3://bucket/prefix``).

    Paths given to the methods are relative to the root and use ``/``.
    """

    def __init__(self, root: str | os.PathLike[str]):
        root = str(root)
        if "://" in root and not root.startswith("file://"):
            self.fs, base = pafs.FileSystem.from_uri(root)
            self.local = False
        else:
            local = root[len("file://") :] if root.startswith("file://") else root
            base = str(Path(local).expanduser().resolve())
            self.fs = pafs.LocalFileSystem()
            self.local = True
        self.base = base.rstrip("/")
        # Local roots are kept absolute so that other processes (Ray actors) see the same place.
        self.uri = self.base if self.local else root

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __reduce__(self):  # pyarrow filesystems pickle, but rebuilding from the URI is simpler
        return (Storage, (self.uri,))

    # -- paths -----------------------------------------------------------------------
    def full(self, rel: str) -> str:
        rel = rel.strip("/")
        return f"{self.base}/{rel}" if rel else self.base

    def local_path(self, rel: str) -> Path:
        """The local path of ``rel``; only for local roots."""
        if not self.local:
            raise StorageError(f"{self.uri} is not a local directory")
        return Path(self.full(rel))

    # -- queries ---------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.full(rel)).type != pafs.FileType.NotFound

    def listdir(self, rel: str) -> list[str]:
        """Names directly under ``rel`` (files and folders), sorted; [] if it does not exist."""
        if self.local:  # names only: pyarrow's selector stats every entry (O(entries) calls)
            try:
                return sorted(os.listdir(self.full(rel)))
            except (FileNotFoundError, NotADirectoryError):
                return []
        sel = pafs.FileSelector(self.full(rel), allow_not_found=True, recursive=False)
        return sorted(info.base_name for info in self.fs.get_file_info(sel))

    # -- bytes -----------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.full(rel)) as f:
                return f.read()
        except FileNotFoundError as e:
            raise StorageError(f"no file {rel!r} under storage root {self.uri}") from e

    def write_bytes(
        self, rel: str, data: bytes, *, exclusive: bool = False, sync_dir: bool = True
    ) -> None:
        """Write atomically. Local: temp file + fsync + rename (+ dir fsync).

        ``exclusive=True`` fails with :class:`AlreadyExists` if the path exists; on a local
        disk that check and the write are one atomic step (``os.link``), on object stores it
        is check-then-write. ``sync_dir=False`` leaves the folder's fsync to a later write
        into the same folder that makes the file count (one folder sync covers every entry
        renamed into it before: a version's weights and ids, then its manifest).
        """
        full = self.full(rel)
        if self.local:
            parent = os.path.dirname(full)
            _makedirs_durable(parent)
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if exclusive:
                    try:
                        os.link(tmp, full)
                    except FileExistsError as e:
                        raise AlreadyExists(f"{rel!r} already exists under {self.uri}") from e
                    finally:
                        os.unlink(tmp)
                else:
                    os.replace(tmp, full)
                if sync_dir:
                    _fsync_dir(parent)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            return
        if exclusive and self.exists(rel):
            raise AlreadyExists(f"{rel!r} already exists under {self.uri}")
        parent = full.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        # Object stores make a PUT visible whole or not at all; write to a temp key for
        # filesystems that do not (HDFS) and move it in place.
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, full)

    def touch(self, rel: str) -> None:
        """Create an empty file, durably (an empty file is whole or absent: no temp file).
        For markers whose name is the message (the deletion log's feed)."""
        full = self.full(rel)
        if self.local:
            parent = os.path.dirname(full)
            _makedirs_durable(parent)
            os.close(os.open(full, os.O_CREAT | os.O_WRONLY, 0o644))
            _fsync_dir(parent)
            return
        self.write_bytes(rel, b"")

    def link_or_copy(self, src: str, dst: str) -> None:
        """Make ``dst`` a file with ``src``'s content, replacing any old ``dst`` atomically:
        a hard link on a local disk (no bytes copied), a server-side copy elsewhere. For files
        that are never changed in place (every write here replaces a file whole)."""
        full_src, full_dst = self.full(src), self.full(dst)
        if self.local:
            parent = os.path.dirname(full_dst)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}.part")
            try:
                try:
                    os.link(full_src, tmp)
                except OSError:  # no hard links here (another device, some mounts): copy
                    shutil.copyfile(full_src, tmp)
                os.replace(tmp, full_dst)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            return
        parent = full_dst.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        self.fs.copy_file(full_src, tmp)
        self.fs.move(tmp, full_dst)

    def delete(self, rel: str) -> None:
        full = self.full(rel)
        info = self.fs.get_file_info(full)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(full)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(full)

    # -- typed helpers ---------------------------------------------------------------
    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, obj: Any, *, exclusive: bool = False) -> None:
        self.write_bytes(
            rel, json.dumps(obj, indent=1, sort_keys=True).encode(), exclusive=exclusive
        )

    def read_table(self, rel: str) -> pa.Table:
        # An Arrow-native file, never a Python object (io.BytesIO, bytes): Parquet's
        # pre-buffering reads on Arrow's I/O threads, and a buffer wrapping a Python object is
        # freed by whichever thread drops it last, which must take the GIL to do it. When that
        # is a worker while the interpreter shuts down, CPython ends the thread with
        # pthread_exit, whose unwinding through a noexcept C++ frame calls std::terminate:
        # "terminate called without an active exception", exit 134, after the command's work
        # was done (seen in a core dump: PyBuffer::~PyBuffer on an Arrow worker).
        try:
            with self.fs.open_input_file(self.full(rel)) as f:
                return pq.read_table(f)
        except FileNotFoundError as e:
            raise StorageError(f"no file {rel!r} under storage root {self.uri}") from e

    def write_table(
        self,
        rel: str,
        table: pa.Table,
        *,
        sync_dir: bool = True,
        row_group_size: int | None = None,
    ) -> None:
        self.write_bytes(rel, table_bytes(table, row_group_size), sync_dir=sync_dir)

    def upload_dir(self, local_dir: str | os.PathLike[str], rel: str) -> None:
        """Copy a local folder's files (recursively) under ``rel``."""
        local_dir = Path(local_dir)
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                self.write_bytes(f"{rel}/{p.relative_to(local_dir).as_posix()}", p.read_bytes())


def table_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    """``table`` as the Parquet file :meth:`Storage.write_table` writes (encoded apart from
    the write, so that the encoding can run ahead of it: platform/core/compaction.py)."""
    buf = pa.BufferOutputStream()  # Arrow-owned memory, as in read_table
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue().to_pybytes()


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run, relative to the storage root."""

    run_id: str

    @property
    def root(self) -> str:
        return f"runs/{self.run_id}"

    @property
    def config(self) -> str:
        return f"{self.root}/config.yaml"

    @property
    def plan(self) -> str:
        return f"{self.root}/plan.parquet"

    @property
    def run_info(self) -> str:
        return f"{self.root}/run.json"

    @property
    def registry(self) -> str:
        return f"{self.root}/models/registry.json"

    @property
    def models(self) -> str:
        return f"{self.root}/models"

    def registry_generation(self, generation: int) -> str:
        """One immutable registry generation, created exclusively (the compare-and-swap)."""
        return f"{self.root}/models/registry/{generation:010d}.json"

    @property
    def publish_intent(self) -> str:
        """What an execution in progress is about to publish (see platform/core/publish.py)."""
        return f"{self.root}/models/publish-intent.json"

    @property
    def executor_control(self) -> str:
        """Where the run's detached executor publishes its control endpoint (URL, token):
        ray_unlearn/train/control.py, which builds the same path without this module."""
        return f"{self.root}/executor/control.json"

    @property
    def lease(self) -> str:
        """The single-executor lease's folder (platform/core/lease.py)."""
        return f"{self.root}/lease"

    def version_dir(self, version_id: str) -> str:
        return f"{self.root}/models/{version_id}"

    def version_weights(self, version_id: str) -> str:
        return f"{self.version_dir(version_id)}/weights.safetensors"

    def version_manifest(self, version_id: str) -> str:
        return f"{self.version_dir(version_id)}/manifest.json"

    def version_samples(self, version_id: str) -> str:
        return f"{self.version_dir(version_id)}/samples.parquet"

    def deletion_request_dir(self, request_id: str) -> str:
        """One request's prefix: its request file and its events (platform/core/deletion_log.py)."""
        return f"{self.root}/deletions/r/{request_id}"

    @property
    def deletion_feed(self) -> str:
        """Change markers in time buckets: what readers follow from a cursor."""
        return f"{self.root}/deletions/feed"

    @property
    def deletion_snapshots(self) -> str:
        """Compacted snapshots of the whole log (the cold reader's starting point)."""
        return f"{self.root}/deletions/snapshots"

    @property
    def deletion_requests(self) -> str:
        """The first layout's requests folder (read once by the migration)."""
        return f"{self.root}/deletions/requests"

    @property
    def deletion_events(self) -> str:
        """The first layout's events folder (read once by the migration)."""
        return f"{self.root}/deletions/events"

    @property
    def deletion_migrated(self) -> str:
        return f"{self.root}/deletions/migrated.json"

    @property
    def data_copy(self) -> str:
        """The run's own copy of its records as one file: runs made before part files
        (read as one part, converted by their first compaction: platform/core/copy_parts.py)."""
        return f"{self.root}/data/records.parquet"

    @property
    def data_parts(self) -> str:
        """The run's own copy of its records: part files (platform/core/copy_parts.py)."""
        return f"{self.root}/data/parts"

    @property
    def data_manifests(self) -> str:
        """Which parts make the copy now: one manifest per generation."""
        return f"{self.root}/data/manifests"

    @property
    def data_compaction(self) -> str:
        return f"{self.root}/data/compaction.json"

    @property
    def reports(self) -> str:
        return f"{self.root}/reports"

    @property
    def train_transport(self) -> str:
        """Where Ray Train keeps its checkpoints (transport only; the registry is the record)."""
        return f"{self.root}/ray_train"


def dataset_path(name: str) -> str:
    """Where a bundled dataset is materialised under the storage root."""
    return f"datasets/{name}.parquet"
