"""Partition plan: a seeded, deterministic map sample -> (shard, slice), stored with the run.

Samples are placed by *group* (the owner, by default): every sample of an owner lands in
the same shard and slice, so forgetting one person retrains one shard from one slice
instead of touching up to K shards. Groups are visited in a seeded random order and packed
into the K*R cells by cumulative sample count, so cells hold near-equal sample counts.

Held-out test samples are in the plan too (shard = slice = -1): they belong to owners and
can be deleted, but no model is trained on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

TEST = -1  # shard/slice value of held-out samples


class PlanError(ValueError):
    """Unknown sample or owner ids, or a plan that does not fit the data."""


def _preview(values, n: int = 5) -> str:
    values = list(values)
    more = f" (and {len(values) - n} more)" if len(values) > n else ""
    return ", ".join(str(v) for v in values[:n]) + more


@dataclass
class PartitionPlan:
    """Columns are aligned arrays sorted by sample id."""

    sample_ids: np.ndarray  # int64 (N,)
    owner_ids: np.ndarray  # str (N,)
    shards: np.ndarray  # int32 (N,), TEST for held-out samples
    slices: np.ndarray  # int32 (N,), TEST for held-out samples
    num_shards: int
    num_slices: int
    _owner_index: dict[str, np.ndarray] = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        order = np.argsort(self.sample_ids, kind="stable")
        self.sample_ids = np.asarray(self.sample_ids, dtype=np.int64)[order]
        self.owner_ids = np.asarray(self.owner_ids).astype(str)[order]
        self.shards = np.asarray(self.shards, dtype=np.int32)[order]
        self.slices = np.asarray(self.slices, dtype=np.int32)[order]
        # owner -> sample ids, built once from the id columns: no scan of the features.
        uniq, inverse = np.unique(self.owner_ids, return_inverse=True)
        groups = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
        self._owner_index = {str(o): self.sample_ids[g] for o, g in zip(uniq, groups, strict=True)}

    # -- lookups ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def owners(self) -> list[str]:
        return list(self._owner_index)

    def positions(self, sample_ids) -> np.ndarray:
        """Row positions of ``sample_ids``; raises PlanError naming unknown ids."""
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self.sample_ids, ids)
        pos_clipped = np.minimum(pos, len(self.sample_ids) - 1)
        bad = (pos >= len(self.sample_ids)) | (self.sample_ids[pos_clipped] != ids)
        if bad.any():
            raise PlanError(
                f"unknown sample ids: {_preview(ids[bad])}; they are not in this run's plan"
            )
        return pos

    def samples_of_owner(self, owner_id: str) -> np.ndarray:
        try:
            return self._owner_index[str(owner_id)]
        except KeyError:
            raise PlanError(
                f"unknown owner id {owner_id!r}: no sample of this run belongs to it"
            ) from None

    def locate(self, sample_ids) -> tuple[np.ndarray, np.ndarray]:
        """(shards, slices) of the given samples (TEST for held-out ones)."""
        pos = self.positions(sample_ids)
        return self.shards[pos], self.slices[pos]

    def shard_members(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample_ids, slices) of one shard, sorted by sample id."""
        m = self.shards == shard
        return self.sample_ids[m], self.slices[m]

    def affected(self, sample_ids) -> dict[int, int]:
        """shard -> first affected slice, for the trained samples among ``sample_ids``."""
        shards, slices = self.locate(sample_ids)
        out: dict[int, int] = {}
        for k, r in zip(shards.tolist(), slices.tolist(), strict=True):
            if k != TEST:
                out[k] = min(out.get(k, r), r)
        return out

    # -- persistence -----------------------------------------------------------------
    def to_table(self) -> pa.Table:
        meta = {
            b"num_shards": str(self.num_shards).encode(),
            b"num_slices": str(self.num_slices).encode(),
        }
        return pa.table(
            {
                "sample_id": pa.array(self.sample_ids, pa.int64()),
                "owner_id": pa.array(self.owner_ids.tolist(), pa.string()),
                "shard": pa.array(self.shards, pa.int32()),
                "slice": pa.array(self.slices, pa.int32()),
            }
        ).replace_schema_metadata(meta)

    @classmethod
    def from_table(cls, table: pa.Table) -> PartitionPlan:
        meta = table.schema.metadata or {}
        return cls(
            sample_ids=table["sample_id"].to_numpy(),
            owner_ids=np.asarray(table["owner_id"].to_pylist(), dtype=str),
            shards=table["shard"].to_numpy(),
            slices=table["slice"].to_numpy(),
            num_shards=int(meta[b"num_shards"]),
            num_slices=int(meta[b"num_slices"]),
        )


def make_plan(
    train_ids: np.ndarray,
    train_owners: np.ndarray,
    *,
    num_shards: int,
    num_slices: int,
    seed: int,
    group_by: str = "owner",
    test_ids: np.ndarray | None = None,
    test_owners: np.ndarray | None = None,
) -> PartitionPlan:
    """Place training samples into ``num_shards`` x ``num_slices`` cells.

    Deterministic: the same ids, owners, sizes and seed give the same plan, whatever the
    input row order.
    """
    if group_by not in ("owner", "sample"):
        raise PlanError(f"group_by must be 'owner' or 'sample', got {group_by!r}")
    train_ids = np.asarray(train_ids, dtype=np.int64)
    train_owners = np.asarray(train_owners).astype(str)
    order = np.argsort(train_ids, kind="stable")
    train_ids, train_owners = train_ids[order], train_owners[order]
    cells = num_shards * num_slices
    if len(train_ids) < cells:
        raise PlanError(
            f"{len(train_ids)} training samples cannot fill {num_shards} shards x {num_slices} slices; "
            f"use fewer shards or slices"
        )
    if group_by == "owner":
        groups, inverse = np.unique(train_owners, return_inverse=True)  # sorted: order-independent
    else:
        groups, inverse = train_ids, np.arange(len(train_ids))
    if len(groups) < cells and group_by == "owner":
        raise PlanError(
            f"{len(groups)} owners cannot fill {cells} cells with group_by=owner; "
            f"use fewer shards/slices or group_by=sample"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x504C414E]))  # "PLAN"
    visit = rng.permutation(len(groups))
    sizes = np.bincount(inverse, minlength=len(groups))[visit]
    # Pack groups into cells by the midpoint of their cumulative count: balanced sizes.
    mid = np.cumsum(sizes) - sizes / 2.0
    cell_of_visited = np.minimum((mid / sizes.sum() * cells).astype(np.int64), cells - 1)
    # Every cell must get at least one group; with many small groups this always holds,
    # otherwise fall back to round-robin placement of the visited groups.
    if len(np.unique(cell_of_visited)) < cells:
        cell_of_visited = np.arange(len(groups)) % cells
    cell_of_group = np.empty(len(groups), dtype=np.int64)
    cell_of_group[visit] = cell_of_visited
    cell = cell_of_group[inverse]
    shards, slices = cell // num_slices, cell % num_slices
    if test_ids is not None and len(test_ids):
        ids = np.concatenate([train_ids, np.asarray(test_ids, dtype=np.int64)])
        owners = np.concatenate([train_owners, np.asarray(test_owners).astype(str)])
        shards = np.concatenate([shards, np.full(len(test_ids), TEST)])
        slices = np.concatenate([slices, np.full(len(test_ids), TEST)])
    else:
        ids, owners = train_ids, train_owners
    if len(np.unique(ids)) != len(ids):
        raise PlanError("sample ids must be unique across the training and test sets")
    return PartitionPlan(ids, owners, shards, slices, num_shards, num_slices)
