"""ERASER certificates: hand-worked cases, then soundness and tightness as properties.

Property tests use dyadic probabilities (multiples of 1/4), so sums and means are exact and
ties are real ties, as in the certificate's arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ray_unlearn.platform.core.aggregate import aggregate, plurality_vote
from ray_unlearn.platform.serving.certify import (
    aggregate_subset,
    certify,
    certify_mean_prob,
    certify_vote,
)

UNITS = 4  # probabilities are multiples of 1/UNITS
FAST = settings(max_examples=200, deadline=None)


def _col(*votes: int) -> np.ndarray:
    """One instance: shard votes as a (K, 1) array."""
    return np.array(votes)[:, None]


def _mask(k: int, *idx: int) -> np.ndarray:
    mask = np.zeros(k, dtype=bool)
    mask[list(idx)] = True
    return mask


# -- vote, by hand ---------------------------------------------------------------------------


def test_vote_tie_break_favours_winner_certified():
    # votes [0,0,0,1,2], shard 0 (voting 0) affected: n = (3,1,1), c* = 0, m = 1, a_0 = 1.
    # c'=1: n0 - a0 = 2 >= n1 + (m - a1) = 1 + 1 = 2, and c* = 0 < 1 so >= suffices: ok.
    # c'=2: 2 >= 1 + 1 = 2, 0 < 2: ok.  -> certified.  (Worst case: it votes 1 -> (2,2,1),
    # a tie that goes to 0.)
    labels, cert = certify_vote(_col(0, 0, 0, 1, 2), _mask(5, 0), 3)
    assert labels.tolist() == [0] and cert.tolist() == [True]
    assert plurality_vote(_col(1, 0, 0, 1, 2), 3).tolist() == [0]


def test_vote_tie_break_against_winner_not_certified():
    # votes [1,1,1,0,2], shard 0 (voting 1) affected: n = (1,3,1), c* = 1, m = 1, a_1 = 1.
    # c'=0: n1 - a1 = 2 vs n0 + (m - a0) = 1 + 1 = 2; c* = 1 > 0 needs >: 2 > 2 fails.
    labels, cert = certify_vote(_col(1, 1, 1, 0, 2), _mask(5, 0), 3)
    assert labels.tolist() == [1] and cert.tolist() == [False]
    # the adversary: the affected shard votes 0 -> (2,2,1), tie goes to 0
    assert plurality_vote(_col(0, 1, 1, 0, 2), 3).tolist() == [0]


def test_vote_affected_shard_voting_challenger():
    # votes [0,0,0,1,2], shard 3 (voting 1) affected: n0 - a0 = 3 > n1 + (1 - 1) = 1 and
    # 3 > n2 + (1 - 0) = 2 -> certified with room to spare.
    assert certify_vote(_col(0, 0, 0, 1, 2), _mask(5, 3), 3)[1].tolist() == [True]
    # two affected shards voting 0: 3 - 2 = 1 vs n1 + 2 = 3 -> not certified
    assert certify_vote(_col(0, 0, 0, 1, 2), _mask(5, 0, 1), 3)[1].tolist() == [False]


def test_vote_edge_cases_vectorised():
    votes = np.array([[0, 1, 2], [0, 1, 2], [0, 1, 0], [1, 1, 0]])  # 4 shards, 3 instances
    labels, cert = certify_vote(votes, np.zeros(4, bool), 3)  # m = 0: everything certified
    assert labels.tolist() == [0, 1, 0] and cert.all()
    assert not certify_vote(votes, np.ones(4, bool), 3)[1].any()  # all affected: nothing
    # shard 3 affected. instance 0: U=(3,0,0), 3 > 0 + 1; instance 1: U=(0,3,0), 3 > 1 (c'=0)
    # instance 2: counts (2,0,2) -> c* = 0; U=(1,0,2): lead over 2 is -1 < 1 -> not certified
    assert certify_vote(votes, _mask(4, 3), 3)[1].tolist() == [True, True, False]
    # a single class: certified unless every shard is affected (the ensemble may vanish)
    assert certify_vote(np.zeros((3, 2), int), _mask(3, 0, 1), 1)[1].tolist() == [True, True]
    assert certify_vote(np.zeros((3, 2), int), np.ones(3, bool), 1)[1].tolist() == [False] * 2


def test_vote_bad_inputs():
    with pytest.raises(ValueError, match="boolean mask"):
        certify_vote(_col(0, 1), np.array([0, 1]), 2)  # an index list is not a mask
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        certify_vote(_col(0, 1), np.array([True]), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        certify_vote(_col(0, 2), np.array([True, False]), 2)
    with pytest.raises(ValueError, match="shards, samples"):
        certify_vote(np.zeros(3, int), np.zeros(3, bool), 2)


# -- mean_prob, by hand ----------------------------------------------------------------------


def test_mean_prob_tie_break_favours_winner_certified():
    # shards 0,1 = [.75,.25], shard 2 (affected) = [.5,.5]: c* = 0, U = (1.5, .5), D_1 = 1.
    # m = 1: D_1 = 1 >= m and c* = 0 < 1 -> certified. Worst case: shard 2 -> [0,1] gives
    # sums (1.5, 1.5), a tie that goes to 0.
    probs = np.array([[[0.75, 0.25]], [[0.75, 0.25]], [[0.5, 0.5]]])
    labels, cert = certify_mean_prob(probs, _mask(3, 2))
    assert labels.tolist() == [0] and cert.tolist() == [True]
    # a conservative tolerance gives up the exact tie
    assert certify_mean_prob(probs, _mask(3, 2), tol=1e-9)[1].tolist() == [False]


def test_mean_prob_tie_break_against_winner_not_certified():
    # mirrored: c* = 1, D_0 = 1 = m but c* = 1 > 0 needs D_0 > m -> not certified.
    probs = np.array([[[0.25, 0.75]], [[0.25, 0.75]], [[0.5, 0.5]]])
    labels, cert = certify_mean_prob(probs, _mask(3, 2))
    assert labels.tolist() == [1] and cert.tolist() == [False]
    post = probs.copy()
    post[2, 0] = [1.0, 0.0]
    assert aggregate(post, "mean_prob")[0].tolist() == [0]  # the adversary wins the tie


def test_mean_prob_vs_vote_can_differ():
    # shards 0-2 = [.5,.5] (vote 0), shard 3 = [.25,.75] (votes 1) and is affected.
    # vote: U counts (3,0), 3 > 0 + m = 1 -> certified.
    # mean: sums (1.75, 2.25) -> c* = 1; U = (1.5, 1.5), D_0 = 0 < m -> not certified.
    probs = np.array([[[0.5, 0.5]]] * 3 + [[[0.25, 0.75]]])
    assert certify(probs, _mask(4, 3), "vote")[1].tolist() == [True]
    assert certify(probs, _mask(4, 3), "mean_prob")[1].tolist() == [False]
    # the other way: confident winners, hesitant losers. Unaffected [1,0],[1,0],[.25,.75] x2;
    # affected [.5,.5]. vote: U counts (2,2), lead 0 < 1 -> not certified.
    # mean: sums (3, 2) -> c* = 0; U = (2.5, 1.5), D_1 = 1 >= m, c* = 0 < 1 -> certified.
    probs = np.array([[[1.0, 0.0]]] * 2 + [[[0.25, 0.75]]] * 2 + [[[0.5, 0.5]]])
    assert certify(probs, _mask(5, 4), "vote")[1].tolist() == [False]
    assert certify(probs, _mask(5, 4), "mean_prob")[1].tolist() == [True]


def test_dispatch_and_subset():
    probs = np.array([[[0.75, 0.25]], [[0.75, 0.25]], [[0.0, 1.0]]])
    with pytest.raises(ValueError, match="allowed: 'vote', 'mean_prob'"):
        certify(probs, _mask(3, 2), "median")
    labels, scores = aggregate_subset(probs, ~_mask(3, 2), "mean_prob")
    assert labels.tolist() == [0] and np.allclose(scores, [[0.75, 0.25]])
    assert aggregate_subset(probs, _mask(3, 2), "vote")[0].tolist() == [1]
    with pytest.raises(ValueError, match="keep selects no shard"):
        aggregate_subset(probs, np.zeros(3, bool), "vote")
    with pytest.raises(ValueError, match="boolean mask"):
        aggregate_subset(probs, np.array([0, 1]), "vote")


# -- properties ------------------------------------------------------------------------------


@st.composite
def instances(draw):
    """(K, n, C) dyadic shard probabilities, a (K,) affected mask, and post-deletion draws."""
    k = draw(st.integers(1, 7))
    n = draw(st.integers(1, 5))
    c = draw(st.integers(1, 4))

    def dyadic(shape):  # each vector: UNITS units dropped into classes
        units = draw(arrays(np.int64, (*shape, UNITS), elements=st.integers(0, c - 1)))
        return (units[..., None] == np.arange(c)).sum(axis=-2) / UNITS

    probs = dyadic((k, n))
    affected = draw(arrays(np.bool_, (k,)))
    post = dyadic((k, n))
    dropped = draw(arrays(np.bool_, (k,)))
    return probs, affected, post, dropped


def _after(probs, affected, post, dropped):
    """Affected shards answer ``post``; affected and ``dropped`` ones leave the ensemble."""
    new = np.where(affected[:, None, None], post, probs)
    return new[~(affected & dropped)]


def _adversary(probs, affected, challenger):
    """Every affected shard puts probability 1 on ``challenger`` (and votes for it)."""
    new = probs.copy()
    new[affected] = np.eye(probs.shape[2])[challenger]
    return new


@pytest.mark.parametrize("rule", ["vote", "mean_prob"])
@FAST
@given(inst=instances())
def test_soundness_certified_answers_survive_any_outcome(rule, inst):
    probs, affected, post, dropped = inst
    labels, cert = certify(probs, affected, rule)
    assert labels.tolist() == aggregate(probs, rule)[0].tolist()  # the label served now
    if not cert.any():
        return
    outcomes = [_after(probs, affected, post, dropped), _after(probs, affected, post, ~dropped)]
    outcomes += [_adversary(probs, affected, c) for c in range(probs.shape[2])]
    keep = ~affected  # certified implies an unaffected shard exists
    outcomes.append(probs[keep])  # every affected shard dropped out
    for after in outcomes:
        new_labels = aggregate(after, rule)[0]
        assert (new_labels[cert] == labels[cert]).all()
    assert (aggregate_subset(probs, keep, rule)[0][cert] == labels[cert]).all()


@pytest.mark.parametrize("rule", ["vote", "mean_prob"])
@FAST
@given(inst=instances())
def test_tightness_uncertified_answers_can_change(rule, inst):
    probs, affected, _, _ = inst
    labels, cert = certify(probs, affected, rule)
    if affected.all():  # every shard may change or vanish: never certified
        assert not cert.any()
        return
    changed = np.zeros(len(labels), dtype=bool)
    for c in range(probs.shape[2]):
        changed |= aggregate(_adversary(probs, affected, c), rule)[0] != labels
    # certified exactly when no "all affected answer c'" outcome changes the answer
    assert (cert == ~changed).all()
