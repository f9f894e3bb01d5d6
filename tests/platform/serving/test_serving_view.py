"""The gateway's decisions without Ray: the deletion tracker and per-instance answers."""

from __future__ import annotations

import numpy as np

from ray_unlearn.platform.core.aggregate import aggregate
from ray_unlearn.platform.core.deletion_log import DeletionRequest, RequestRecord, RequestState
from ray_unlearn.platform.core.plan import TEST, PartitionPlan
from ray_unlearn.platform.serving.policies import get_policy
from ray_unlearn.platform.serving.view import DeletionTracker, answer_batch, shards_to_query


def _record(rid, ids, t=100.0):
    return RequestRecord(DeletionRequest(rid, list(ids), None, t, None), RequestState.PENDING, [])


def _plan():
    return PartitionPlan(
        sample_ids=np.arange(6),
        owner_ids=np.array(list("aabbcc")),
        shards=np.array([0, 0, 1, 2, TEST, 3]),
        slices=np.zeros(6, int),
        num_shards=4,
        num_slices=1,
    )


def test_tracker_follows_the_log():
    tr = DeletionTracker(_plan())
    tr.add(_record("r1", [0, 2]))
    tr.add(_record("r2", [4]))  # held-out only: affects no shard
    assert tr.affected() == {0, 1} and len(tr.views()) == 2
    assert (
        tr.begin_execution() == ["r1", "r2"]
        and tr.executing_shards() == {0, 1}
        and tr.views() == []
    )
    tr.abort_execution(["r1"])
    assert tr.executing_shards() == set() and [p.request_id for p in tr.waiting()] == ["r1"]
    tr.sync([_record("r3", [5])])  # r1, r2 done elsewhere; r3 logged by another process
    assert list(tr.items) == ["r3"] and tr.affected() == {3}


def test_tracker_executes_the_oldest_first_when_limited():
    tr = DeletionTracker(_plan())
    for rid, t in [("late", 30.0), ("first", 10.0), ("second", 20.0)]:
        tr.add(_record(rid, [0], t))
    assert tr.begin_execution(1) == ["first"]
    assert tr.begin_execution(1) == ["second"]
    assert tr.begin_execution() == ["late"] and tr.waiting() == []


def _probs(labels, classes=3):
    """(K, n) labels -> shard -> (n, classes) one-hot probabilities."""
    return {k: np.eye(classes)[row] for k, row in enumerate(np.asarray(labels))}


def test_answers_by_policy():
    # 5 shards, 2 instances. Instance 0: votes 0,0,0,0,1 -> safe with shard 4 affected.
    # Instance 1: votes 0,0,1,1,2 -> with shard 4 affected, 2+... 0 leads 2-2 over 1: not safe.
    labels = np.array([[0, 0], [0, 0], [0, 1], [0, 1], [1, 2]])
    probs = _probs(labels)
    live, affected = [0, 1, 2, 3, 4], {4}
    queried = {
        k: v
        for k, v in probs.items()
        if k in shards_to_query(get_policy("lazy-wait"), live, affected)
    }
    assert sorted(queried) == [0, 1, 2, 3]  # a safe policy never asks the affected shard

    ans = answer_batch(get_policy("lazy-wait"), "vote", live, affected, queried, n=2, pending=True)
    assert (
        [a.mode for a in ans] == ["certified", "wait"]
        and ans[0].label == 0
        and ans[1].label is None
    )
    ans = answer_batch(
        get_policy("batched-exclude"), "vote", live, affected, queried, n=2, pending=True
    )
    assert [a.mode for a in ans] == ["certified", "excluded"]
    assert ans[1].label == 0  # unaffected shards: 0,0,1,1 -> tie -> smallest label
    ans = answer_batch(
        get_policy("lazy-reject"), "vote", live, affected, queried, n=2, pending=True
    )
    assert [a.mode for a in ans] == ["certified", "reject"]
    ans = answer_batch(
        get_policy("inference-oblivion"), "vote", live, affected, queried, n=2, pending=True
    )
    assert [a.mode for a in ans] == ["wait", "wait"]
    ans = answer_batch(
        get_policy("naive-postponed"), "vote", live, affected, probs, n=2, pending=True
    )
    assert [a.mode for a in ans] == ["stale", "stale"]
    assert [a.label for a in ans] == aggregate(np.stack([probs[k] for k in live]), "vote")[
        0
    ].tolist()


def test_certified_answers_equal_every_post_deletion_answer():
    rng = np.random.default_rng(0)
    for _ in range(300):
        k, n, c = 7, 4, 3
        labels = rng.integers(0, c, (k, n))
        affected = set(rng.choice(k, size=rng.integers(1, 3), replace=False).tolist())
        probs = _probs(labels, c)
        queried = {s: p for s, p in probs.items() if s not in affected}
        ans = answer_batch(
            get_policy("lazy-wait"),
            "vote",
            list(range(k)),
            affected,
            queried,
            n=n,
            pending=True,
        )
        after = labels.copy()
        for s in affected:
            after[s] = rng.integers(0, c, n)
        truth = aggregate(np.stack([np.eye(c)[r] for r in after]), "vote")[0]
        for i, a in enumerate(ans):
            if a.mode == "certified":
                assert a.label == truth[i]


def test_nothing_pending_means_certified_and_all_affected_falls_back():
    probs = _probs([[1], [1], [2]])
    ans = answer_batch(
        get_policy("inference-oblivion"), "vote", [0, 1, 2], set(), probs, n=1, pending=False
    )
    assert ans[0].mode == "certified" and ans[0].label == 1
    ans = answer_batch(
        get_policy("batched-exclude"), "vote", [0, 1, 2], {0, 1, 2}, {}, n=1, pending=True
    )
    assert ans[0].mode == "wait"  # nothing unaffected to exclude to
