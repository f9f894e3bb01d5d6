"""Model versions with manifests, the registry of live versions, and audits.

A *version* is one shard's snapshot after one slice: ``s003-r02-g0001`` is shard 3 after
slice 2, generation 1 (generation 0 comes from the training job; each retrain of a shard
bumps it). Each version folder is self-describing::

    models/<version>/weights.safetensors   the weights (safetensors: no pickle)
    models/<version>/samples.parquet       the exact sample ids it was trained on
    models/<version>/manifest.json         shard, slice, generation, parent, config digest,
                                           sample count and hash, metrics, state

The registry names each shard's live chain of versions, one per slice. Every version in a
live chain is *live*: the last one serves, the earlier ones are the restart points of future
retrains, and all of them hold data. When a deletion retires a version its weights are
purged and its manifest says by which request.

The registry is written by compare-and-swap, so two writers never lose an update::

    models/registry/<g:010d>.json   generation g, immutable, created exclusively
    models/registry.json            a copy of the newest generation (the read path)

A writer names the generation it read; it creates generation g+1 exclusively and fails with
:class:`RegistryConflict` if another writer got there first (the caller re-reads, then
retries or aborts). Creating g+1 is the switch; the copy in ``registry.json`` follows. A
reader reads ``registry.json`` and then checks that g+1 does not exist (one ``exists``),
following newer generations if a writer crashed between the two writes: two small I/Os
per read whatever the history. Old generation files are pruned, ``KEEP_GENERATIONS`` kept.
Runs written before this scheme have only ``registry.json`` (generation 0) and are read as
they are; their next write creates generation 1. On object stores the exclusive create is
check-then-write (pyarrow has no conditional PUT): there the executor lease
(platform/core/lease.py) is what keeps writers single.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ray_unlearn.platform.core import sample_index
from ray_unlearn.platform.core.storage import AlreadyExists, RunLayout, Storage, StorageError

LIVE, RETIRED = "live", "retired"
KEEP_GENERATIONS = 8  # registry generation files kept behind the newest
# Files of a version folder that are evidence, not data-derived: what it was, and which ids
# it was trained on (the audit needs them). Everything else (weights, recorded updates) goes.
EVIDENCE = frozenset({"manifest.json", "samples.parquet"})


class RegistryConflict(RuntimeError):
    """A registry write found that another writer published after the generation it read."""


def version_id(shard: int, stage: int, generation: int) -> str:
    return f"s{shard:03d}-r{stage:02d}-g{generation:04d}"


def sample_hash(sample_ids: np.ndarray) -> str:
    ids = np.sort(np.asarray(sample_ids, dtype=np.int64))
    return hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()


@dataclass
class ShardEntry:
    """One shard in the registry: its live chain (version per slice) and its generation."""

    chain: list[str]
    generation: int
    empty: bool = False  # every sample deleted: no model, excluded from the ensemble
    # S3T shards keep several orders' stages live; the one that serves is named here, and
    # ``meta`` holds the orders and the slices hit by deletions (platform/methods/s3t/runtime.py).
    serving_version: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def serving(self) -> str | None:
        if self.empty or not self.chain:
            return None
        return self.serving_version or self.chain[-1]

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "chain": self.chain,
            "generation": self.generation,
            "empty": self.empty,
        }
        if self.serving_version is not None:
            d["serving_version"] = self.serving_version
        if self.meta:
            d["meta"] = self.meta
        return d

    @classmethod
    def from_json(cls, v: dict[str, Any]) -> ShardEntry:
        return cls(
            v["chain"],
            v["generation"],
            v.get("empty", False),
            v.get("serving_version"),
            v.get("meta", {}),
        )


@dataclass
class Registry:
    shards: dict[int, ShardEntry] = field(default_factory=dict)
    updated_at: float = 0.0
    shared: list[str] = field(default_factory=list)  # live versions of no shard (S3T backbone)
    # the registry generation this was read at (0: none yet); None: built, not read, so a
    # write of it replaces whatever is current (training writes the first registry)
    generation: int | None = None

    def live_versions(self) -> list[str]:
        return [*self.shared, *(v for e in self.shards.values() for v in e.chain)]

    def serving_versions(self) -> dict[int, str]:
        return {k: e.serving for k, e in sorted(self.shards.items()) if e.serving is not None}

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation or 0,
            "updated_at": self.updated_at,
            "shared": self.shared,
            "shards": {str(k): e.to_json() for k, e in sorted(self.shards.items())},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Registry:
        return cls(
            {int(k): ShardEntry.from_json(v) for k, v in d["shards"].items()},
            d.get("updated_at", 0.0),
            d.get("shared", []),
        )


class ModelStore:
    """Reads and writes a run's model versions and registry."""

    def __init__(self, storage: Storage, layout: RunLayout):
        self.storage, self.layout = storage, layout
        self._samples_cache: dict[str, np.ndarray] = {}
        self._metrics_cache: dict[str, dict[str, float]] = {}
        self._index_cache: dict[tuple[str, ...], Any] = {}  # IndexGroup or StoredGroup

    # -- versions --------------------------------------------------------------------
    def save_version(
        self,
        *,
        shard: int,
        stage: int,
        generation: int,
        state: dict[str, torch.Tensor],
        sample_ids: np.ndarray,
        parent: str | None,
        metrics: dict[str, float],
        config_digest: str,
        created_by: str,
        vid: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write weights, sample ids, then the manifest (the manifest's presence = complete).

        ``vid`` overrides the SISA naming; ``extra`` adds fields to the manifest."""
        vid = vid or version_id(shard, stage, generation)
        blob = st_save({k: v.contiguous() for k, v in state.items()})
        ids = np.sort(np.asarray(sample_ids, dtype=np.int64))
        # the manifest's write syncs the folder for all three (it is what makes them count)
        self.storage.write_bytes(self.layout.version_weights(vid), blob, sync_dir=False)
        self.storage.write_table(
            self.layout.version_samples(vid), pa.table({"sample_id": ids}), sync_dir=False
        )
        manifest = {
            "version": vid,
            "run_id": self.layout.run_id,
            "shard": shard,
            "slice": stage,
            "generation": generation,
            "parent": parent,
            "config_digest": config_digest,
            "n_samples": int(len(ids)),
            "sample_hash": sample_hash(ids),
            "weights_sha256": hashlib.sha256(blob).hexdigest(),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "created_at": time.time(),
            "created_by": created_by,
            "state": LIVE,
            **(extra or {}),
        }
        self.storage.write_json(self.layout.version_manifest(vid), manifest)
        self._samples_cache[vid] = ids
        return manifest

    def manifest(self, vid: str) -> dict[str, Any]:
        return self.storage.read_json(self.layout.version_manifest(vid))

    def manifest_metrics(self, vid: str) -> dict[str, float]:
        """A version's manifest metrics: written once at save and never changed (retiring a
        version changes only its state), so read once per process."""
        if vid not in self._metrics_cache:
            self._metrics_cache[vid] = dict(self.manifest(vid).get("metrics", {}))
        return self._metrics_cache[vid]

    def load_state(self, vid: str) -> dict[str, torch.Tensor]:
        path = self.layout.version_weights(vid)
        if not self.storage.exists(path):
            raise FileNotFoundError(
                f"weights of version {vid} are not in the store (purged or never written)"
            )
        return st_load(self.storage.read_bytes(path))

    def sample_ids(self, vid: str) -> np.ndarray:
        if vid not in self._samples_cache:
            t = self.storage.read_table(self.layout.version_samples(vid))
            self._samples_cache[vid] = t["sample_id"].to_numpy()
        return self._samples_cache[vid]

    def retire(self, vids: list[str], *, request_ids: list[str]) -> None:
        """Mark versions retired and purge their weights (the manifest stays as evidence).

        Idempotent: a version already retired keeps its manifest (who retired it, when) and
        loses any data file still there; one with no manifest (its save was cut short) is
        removed whole. Recovery after a crash relies on this."""
        now = time.time()
        # The sample index must not outlive the versions it names (it holds their ids).
        sample_index.drop_groups_with(self, vids)
        self._index_cache = {k: g for k, g in self._index_cache.items() if not set(k) & set(vids)}
        for vid in vids:
            folder = self.layout.version_dir(vid)
            names = self.storage.listdir(folder)
            if "manifest.json" not in names:
                self.storage.delete(folder)
                continue
            m = self.manifest(vid)
            fresh = m.get("state") != RETIRED
            # Everything derived from the data goes (weights, recorded training updates);
            # only the evidence stays: the manifest and the list of ids it was trained on.
            for name in names:
                if name not in EVIDENCE:
                    self.storage.delete(f"{folder}/{name}")
            if fresh:
                m.update(
                    state=RETIRED, retired_at=now, retired_by=list(request_ids), weights_purged=True
                )
                self.storage.write_json(self.layout.version_manifest(vid), m)

    def version_folders(self) -> list[str]:
        """Every version folder on disk (one listing of ``models/``; for audits and crash
        recovery, not for the hot path)."""
        skip = {"registry", "registry.json", "publish-intent.json"}
        return [
            n
            for n in self.storage.listdir(self.layout.models)
            if n not in skip and not n.startswith(".")
        ]

    def data_files(self, vid: str) -> list[str]:
        """The files of a version folder that are derived from data (not evidence)."""
        return [n for n in self.storage.listdir(self.layout.version_dir(vid)) if n not in EVIDENCE]

    # -- registry --------------------------------------------------------------------
    def registry(self) -> Registry:
        """The newest registry: read ``registry.json``, then follow any newer generation
        (normally one ``exists`` that says there is none)."""
        gen, doc = self._current()
        reg = Registry.from_json(doc) if doc is not None else Registry()
        reg.generation = gen
        return reg

    def registry_generation(self) -> int:
        return self._current()[0]

    def _current(self) -> tuple[int, dict[str, Any] | None]:
        try:
            doc = self.storage.read_json(self.layout.registry)
        except StorageError:
            doc = None
        gen = int(doc.get("generation", 0)) if doc is not None else 0
        while self.storage.exists(self.layout.registry_generation(gen + 1)):
            try:
                doc = self.storage.read_json(self.layout.registry_generation(gen + 1))
            except StorageError:  # pruned meanwhile by a writer far ahead: re-read the copy
                return self._current()
            gen += 1
        return gen, doc

    def write_registry(self, reg: Registry) -> int:
        """Publish ``reg`` as the next registry generation; returns that generation.

        A registry read from the store (``reg.generation`` set) is written only if it is
        still the newest: otherwise :class:`RegistryConflict`. A registry built from scratch
        (``generation`` None: training's first registry) replaces whatever is current."""
        expected = reg.generation
        while True:
            base = self._current()[0] if expected is None else expected
            nxt = base + 1
            reg.updated_at = time.time()
            reg.generation = nxt
            try:
                self.storage.write_json(
                    self.layout.registry_generation(nxt), reg.to_json(), exclusive=True
                )
            except AlreadyExists:
                reg.generation = expected
                if expected is None:
                    continue  # an unconditional write: place it after the newer one
                raise RegistryConflict(
                    f"run {self.layout.run_id}: the registry moved past generation {expected} "
                    f"(generation {nxt} was published by another writer); re-read and retry"
                ) from None
            break
        # The switch is done; the copy on the read path follows, unless a newer one exists.
        if not self.storage.exists(self.layout.registry_generation(nxt + 1)):
            self.storage.write_json(self.layout.registry, reg.to_json())
        old = nxt - KEEP_GENERATIONS
        if old > 0:
            self.storage.delete(self.layout.registry_generation(old))
        return nxt

    # -- audit -----------------------------------------------------------------------
    def live_versions_containing(
        self, sample_ids, registry: Registry | None = None
    ) -> dict[str, list[int]]:
        """version -> the given sample ids it was trained on, over every live version, from
        the stored sample index (platform/core/sample_index.py): binary searches per live
        chain, not a scan of every version's sample list."""
        reg = registry or self.registry()
        wanted = np.unique(np.asarray(sample_ids, dtype=np.int64).reshape(-1))
        out: dict[str, list[int]] = {}
        for group in self.sample_index(reg):
            for vid, hits in group.holding(wanted).items():
                out.setdefault(vid, []).extend(hits)
        return {v: sorted(set(h)) for v, h in out.items()}

    def sample_index(self, registry: Registry | None = None) -> list:
        """The index groups of the live versions: one per shard's chain, one for the shared
        versions; read (or built and stored) once per chain and kept in this process."""
        reg = registry or self.registry()
        groups = [tuple(e.chain) for _, e in sorted(reg.shards.items()) if e.chain]
        if reg.shared:
            groups.append(tuple(reg.shared))
        out = []
        for versions in groups:
            if versions not in self._index_cache:
                self._index_cache[versions] = sample_index.load_or_build(self, versions)
            out.append(self._index_cache[versions])
        if set(self._index_cache) != set(groups):  # chains changed: forget and drop the old
            self._index_cache = {v: self._index_cache[v] for v in groups}
            keep = {sample_index.group_path(self.layout, v) for v in groups}
            sample_index.drop_groups_except(self, keep)
        return out


def chain_exactness(ctx, chain: list[str]) -> list[bool]:
    """Per stage of a live chain: is its snapshot exact (equal to training without every
    deleted sample)? A version's manifest says ``metrics.exact = 0`` when a strategy
    produced it approximately; a snapshot is exact when it and all its ancestors (the
    chain before it) are. ``ctx``: the run (its ``model_store``)."""
    out, ok = [], True
    for vid in chain:
        ok = ok and ctx.model_store.manifest_metrics(vid).get("exact", 1.0) != 0
        out.append(ok)
    return out
