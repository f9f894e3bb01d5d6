"""Partition plan: determinism, balance, owner grouping, lookups, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from ray_unlearn.platform.core.plan import TEST, PartitionPlan, PlanError, make_plan


def _data(n=600, owners=150, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1000, 1000 + n)).astype(np.int64)
    own = np.array([f"o{int(i)}" for i in rng.integers(0, owners, n)])
    return ids, own


def test_same_inputs_same_plan_whatever_the_row_order():
    ids, own = _data()
    a = make_plan(ids, own, num_shards=4, num_slices=3, seed=7)
    perm = np.random.default_rng(3).permutation(len(ids))
    b = make_plan(ids[perm], own[perm], num_shards=4, num_slices=3, seed=7)
    assert np.array_equal(a.sample_ids, b.sample_ids)
    assert np.array_equal(a.shards, b.shards) and np.array_equal(a.slices, b.slices)


def test_seed_changes_the_plan():
    ids, own = _data()
    a = make_plan(ids, own, num_shards=4, num_slices=3, seed=7)
    b = make_plan(ids, own, num_shards=4, num_slices=3, seed=8)
    assert not np.array_equal(a.shards, b.shards)


@pytest.mark.parametrize("group_by", ["owner", "sample"])
def test_every_cell_filled_and_balanced(group_by):
    ids, own = _data(n=2000, owners=500)
    p = make_plan(ids, own, num_shards=5, num_slices=4, seed=0, group_by=group_by)
    counts = np.zeros((5, 4), int)
    np.add.at(counts, (p.shards, p.slices), 1)
    assert counts.min() > 0
    assert counts.max() - counts.min() <= (12 if group_by == "owner" else 1)


def test_owner_samples_share_one_shard_and_slice():
    ids, own = _data()
    p = make_plan(ids, own, num_shards=4, num_slices=3, seed=0)
    for o in p.owners[:50]:
        shards, slices = p.locate(p.samples_of_owner(o))
        assert len(set(shards.tolist())) == 1 and len(set(slices.tolist())) == 1
    o = p.owners[0]
    assert p.affected(p.samples_of_owner(o)) == {
        int(p.locate(p.samples_of_owner(o))[0][0]): int(p.locate(p.samples_of_owner(o))[1][0])
    }


def test_affected_is_first_slice_per_shard_and_ignores_test_samples():
    p = PartitionPlan(
        sample_ids=np.array([1, 2, 3, 4, 5]),
        owner_ids=np.array(["a", "a", "b", "c", "c"]),
        shards=np.array([0, 0, 1, TEST, 1]),
        slices=np.array([2, 1, 0, TEST, 3]),
        num_shards=2,
        num_slices=4,
    )
    assert p.affected([1, 2, 4, 5]) == {0: 1, 1: 3}
    assert p.affected([4]) == {}
    assert p.samples_of_owner("c").tolist() == [4, 5]


def test_unknown_ids_and_owners_are_named():
    ids, own = _data()
    p = make_plan(ids, own, num_shards=2, num_slices=2, seed=0)
    with pytest.raises(PlanError, match="unknown sample ids: 5, 6"):
        p.positions([int(ids[0]), 5, 6])
    with pytest.raises(PlanError, match="unknown owner id 'nobody'"):
        p.samples_of_owner("nobody")


def test_too_few_samples_or_owners():
    with pytest.raises(PlanError, match="cannot fill 4 shards x 3 slices"):
        make_plan(np.arange(5), np.array(["a"] * 5), num_shards=4, num_slices=3, seed=0)
    with pytest.raises(PlanError, match="owners cannot fill"):
        make_plan(np.arange(50), np.array(["a", "b"] * 25), num_shards=2, num_slices=2, seed=0)
    with pytest.raises(PlanError, match="group_by"):
        make_plan(
            np.arange(50), np.array(["a"] * 50), num_shards=1, num_slices=1, seed=0, group_by="x"
        )


def test_roundtrip_through_arrow_with_test_samples():
    ids, own = _data()
    p = make_plan(
        ids[:500],
        own[:500],
        num_shards=3,
        num_slices=2,
        seed=4,
        test_ids=ids[500:],
        test_owners=own[500:],
    )
    q = PartitionPlan.from_table(p.to_table())
    assert (q.num_shards, q.num_slices) == (3, 2)
    for col in ("sample_ids", "owner_ids", "shards", "slices"):
        assert np.array_equal(getattr(p, col), getattr(q, col))
    assert (q.shards == TEST).sum() == 100
