"""The answer journal: every answer a gateway replica commits, append-only, bounded, rotated.

Layout, per replica (so replicas never write the same file)::

    runs/<id>/journal/<replica>/<seq:08d>.jsonl    up to ``segment_answers`` answers each

One JSON object per line: the receipt of one answered instance (when it was committed, the
versions that voted, the excluded shards, the certificate's inputs), never the input
features. A segment is rewritten whole on every flush (an atomic replace: object stores
cannot append), so a reader sees a segment before or after a flush, never torn; once full
it is never written again. At most ``max_segments`` segments are kept per replica, oldest
dropped first, so the journal is bounded (default 200 x 256 = 51,200 answers per replica).
Answers committed since the last flush are lost if the process dies; the gateway flushes
every fence interval (0.1 s by default). No Ray here.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from ray_unlearn.platform.core.storage import RunLayout, Storage, StorageError

DEFAULT_SEGMENT_ANSWERS = 256
DEFAULT_MAX_SEGMENTS = 200


def journal_dir(layout: RunLayout, replica: str | None = None) -> str:
    base = f"{layout.root}/journal"
    return base if replica is None else f"{base}/{replica}"


class AnswerJournal:
    """One replica's journal writer. :meth:`append` (the event loop) and :meth:`flush` (a
    worker thread) may run at once: a lock guards the buffer, never held over a write."""

    def __init__(
        self,
        storage: Storage,
        layout: RunLayout,
        replica: str,
        *,
        segment_answers: int = DEFAULT_SEGMENT_ANSWERS,
        max_segments: int = DEFAULT_MAX_SEGMENTS,
    ):
        if segment_answers < 1 or max_segments < 1:
            raise ValueError(
                f"segment_answers ({segment_answers}) and max_segments ({max_segments}) "
                "must be >= 1"
            )
        self.storage, self.layout, self.replica = storage, layout, replica
        self.segment_answers, self.max_segments = segment_answers, max_segments
        self.seq = 0  # the segment being filled
        self.lines: list[str] = []  # its answers so far (serialised)
        self.written = 0  # how many of ``lines`` the stored segment holds
        self.answers = 0  # answers appended in this process's life
        self._lock = threading.Lock()

    def append(self, entries: Iterable[dict[str, Any]]) -> None:
        """Add committed answers (in memory, until :meth:`flush`). Synchronous on purpose:
        the gateway appends in the same step that commits the answer."""
        new = [json.dumps(e, sort_keys=True, allow_nan=False) for e in entries]
        with self._lock:
            self.lines.extend(new)
            self.answers += len(new)

    def flush(self) -> None:
        """Write the current segment (whole), roll full ones over, drop the oldest beyond
        ``max_segments``. Safe to call often: does nothing when nothing was appended."""
        while True:
            with self._lock:
                if self.written == len(self.lines) and len(self.lines) < self.segment_answers:
                    return
                chunk = self.lines[: self.segment_answers]
                seq = self.seq
            self._write(seq, chunk)
            with self._lock:
                if len(chunk) < self.segment_answers:
                    self.written = len(chunk)
                    continue  # more may have come meanwhile: the loop checks
                self.lines = self.lines[self.segment_answers :]
                self.written = 0
                self.seq += 1
            self._prune()

    def _write(self, seq: int, lines: list[str]) -> None:
        path = f"{journal_dir(self.layout, self.replica)}/{seq:08d}.jsonl"
        self.storage.write_bytes(path, ("\n".join(lines) + "\n").encode())

    def _prune(self) -> None:
        oldest_kept = self.seq - self.max_segments + 1
        if oldest_kept > 0:
            stale = f"{journal_dir(self.layout, self.replica)}/{oldest_kept - 1:08d}.jsonl"
            self.storage.delete(stale)


def _parse_lines(text: str, where: str) -> Iterator[dict[str, Any]]:
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}, line {i}: not a JSON answer record ({e})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}, line {i}: an answer record is a JSON object")
        yield obj


def read_journal(storage: Storage, layout: RunLayout) -> list[dict[str, Any]]:
    """Every answer in the run's journal, all replicas, ordered by commit time."""
    out: list[dict[str, Any]] = []
    for replica in storage.listdir(journal_dir(layout)):
        folder = journal_dir(layout, replica)
        for name in storage.listdir(folder):
            if name.endswith(".jsonl") and not name.startswith("."):
                try:
                    text = storage.read_bytes(f"{folder}/{name}").decode()
                except StorageError:
                    continue  # pruned between the listing and the read
                out.extend(_parse_lines(text, f"{folder}/{name}"))
    return sorted(out, key=lambda e: float(e.get("committed_at", 0.0)))


def read_journal_file(path: str) -> list[dict[str, Any]]:
    """Answers from one local JSON-lines file (``verify-exposure --journal FILE``)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return sorted(_parse_lines(text, path), key=lambda e: float(e.get("committed_at", 0.0)))
