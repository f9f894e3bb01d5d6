"""ERASER certificates: when can an inference be answered while deletions are pending?

Deletions are pending (or executing) on a set A of m shards. After unlearning, an affected
shard may output anything: any label (vote), any probability vector on the simplex
(mean_prob), or nothing at all when its shard was emptied and it leaves the ensemble. An
answer is *certified* when the aggregate is the same whatever the affected shards output
afterwards. "Keep the current outputs" is one of those outcomes, so a certified answer is
both the current answer and the post-deletion answer: serving it now exposes nothing.

Both certificates depend only on the *unaffected* shards' outputs and on m, never on what
the affected shards say now. So a gateway can certify while an affected shard is busy
retraining in place (single context) and cannot answer: certify from the shards that can.
Because "the affected shards drop out" is one of the covered outcomes, a certified label is
also the label of the unaffected shards alone (:func:`aggregate_subset`).

Ties follow :mod:`ray_unlearn.platform.core.aggregate`: the smallest label wins, both rules. Every
function is vectorised over the n instances of a batch. No Ray import here.
"""

from __future__ import annotations

import numpy as np

from ray_unlearn.platform.core.aggregate import (
    aggregate,
    mean_probability,
    plurality_vote,
    vote_counts,
)

RULES = ("vote", "mean_prob")


def _mask(affected: np.ndarray, k: int, name: str = "affected") -> np.ndarray:
    """A (K,) boolean mask. Integer arrays are refused: [0, 3] is an index list, not a mask."""
    mask = np.asarray(affected)
    if mask.dtype != np.bool_:
        raise ValueError(f"{name} must be a boolean mask of shape ({k},), got dtype {mask.dtype}")
    if mask.shape != (k,):
        raise ValueError(f"{name} must have shape ({k},) (one flag per shard), got {mask.shape}")
    return mask


def _check_3d(probs: np.ndarray) -> None:
    if probs.ndim != 3:
        raise ValueError(f"shard_probs must be (shards, samples, classes), got shape {probs.shape}")


def _beats(margin: np.ndarray, winner: np.ndarray, bound: float) -> np.ndarray:
    """(n, C) -> (n,): for every c' != c*, margin[c'] > bound, or == bound when c* < c'.

    ``margin[:, c']`` is the unaffected shards' lead of c* over c' (counts or summed
    probabilities); ``bound`` is the most the m affected shards can take off that lead.
    Equality is enough when the tie-break (smallest label) favours c*.
    """
    classes = np.arange(margin.shape[1])
    holds = (margin > bound) | ((margin == bound) & (classes[None, :] > winner[:, None]))
    holds[np.arange(margin.shape[0]), winner] = True  # c* need not beat itself
    return holds.all(axis=1)


def certify_vote(
    shard_labels: np.ndarray, affected: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Certify plurality votes: (K, n) labels, (K,) affected mask -> ((n,) labels, (n,) bool).

    With vote counts n_c, winner c* (ties to the smallest label) and a_c affected shards now
    voting c, the worst case for a challenger c' is that every affected shard votes c'
    (dropping out instead takes the same vote from c* and gives c' less). So c* survives
    every outcome iff for all c' != c*::

        n_{c*} - a_{c*}  >  n_{c'} + (m - a_{c'})      (>= when c* < c')

    i.e. the unaffected counts satisfy n^U_{c*} - n^U_{c'} > m (>= m when c* < c').
    If that fails for some c', "all affected vote c'" changes the answer: the test is tight.
    m == 0 is always certified; if every shard is affected nothing is certified (the whole
    ensemble may change, or vanish).
    """
    labels = np.asarray(shard_labels)
    if labels.ndim != 2:
        raise ValueError(f"shard_labels must be (shards, samples), got shape {labels.shape}")
    k, n = labels.shape
    if k == 0:
        raise ValueError("no shard model to certify: shard_labels has 0 shards")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"shard_labels must be integer labels, got dtype {labels.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"shard_labels must lie in [0, {num_classes}), got {labels.min()}..")
    mask = _mask(affected, k)
    winner = plurality_vote(labels, num_classes)
    m = int(mask.sum())
    if m == 0:
        return winner, np.ones(n, dtype=bool)
    if m == k:
        return winner, np.zeros(n, dtype=bool)
    unaffected = vote_counts(labels[~mask], num_classes)  # n^U_c = n_c - a_c
    lead = np.take_along_axis(unaffected, winner[:, None], axis=1) - unaffected
    return winner, _beats(lead, winner, m)


def certify_mean_prob(
    shard_probs: np.ndarray, affected: np.ndarray, *, tol: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Certify mean-probability answers: (K, n, C) probs, (K,) mask -> ((n,) labels, (n,) bool).

    Derivation. The aggregate is the mean over the shards that remain, and the argmax of a
    mean is the argmax of the sum, so compare sums. Let U be the unaffected shards' summed
    vectors and D_{c'} = U[c*] - U[c'] their lead of the current winner c* over c'. After
    deletion the lead is D_{c'} + sum over the affected shards that remain of
    (q[c*] - q[c']), with each q on the simplex, so every term lies in [-1, 1], reaching -1
    only at q = e_{c'}; a shard that drops out adds 0 > -1. The worst case is therefore
    D_{c'} - m, independently for every c' (linear in each q), and c* survives every outcome
    iff for all c' != c*::

        D_{c'} > m      (>= m when c* < c', the tie-break favouring c*)

    The test is tight: if it fails for c', the affected shards all answering e_{c'} make c'
    beat (or tie below) c*. m == 0 is always certified; if every shard is affected, U = 0
    and nothing is certified.

    ``tol`` > 0 demands D_{c'} >= m + tol (strictly more than m + tol unless the tie-break
    favours c*): a conservative margin against floating-point rounding between this sum and
    the aggregate's mean. The default 0 is the exact condition.
    """
    probs = np.asarray(shard_probs, dtype=np.float64)
    _check_3d(probs)
    k, n, _ = probs.shape
    if k == 0:
        raise ValueError("no shard model to certify: shard_probs has 0 shards")
    if not np.isfinite(probs).all():
        raise ValueError("shard_probs must be finite (found NaN or inf)")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    mask = _mask(affected, k)
    winner, _ = mean_probability(probs)  # the label actually served, same code path
    m = int(mask.sum())
    if m == 0:
        return winner, np.ones(n, dtype=bool)
    if m == k:
        return winner, np.zeros(n, dtype=bool)
    unaffected = probs[~mask].sum(axis=0)  # U, (n, C)
    lead = np.take_along_axis(unaffected, winner[:, None], axis=1) - unaffected
    return winner, _beats(lead - tol, winner, m)


def certify(
    shard_probs: np.ndarray, affected: np.ndarray, rule: str
) -> tuple[np.ndarray, np.ndarray]:
    """Certify (K, n, C) shard outputs under aggregation ``rule`` ('vote' or 'mean_prob').

    For 'vote' each shard's label is the argmax of its probabilities, as in
    :func:`ray_unlearn.platform.core.aggregate.aggregate`. Returns ((n,) labels, (n,) certified).
    """
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; allowed: 'vote', 'mean_prob'")
    probs = np.asarray(shard_probs)
    _check_3d(probs)
    if rule == "vote":
        return certify_vote(probs.argmax(axis=2), affected, probs.shape[2])
    return certify_mean_prob(probs, affected)


def aggregate_subset(
    shard_probs: np.ndarray, keep: np.ndarray, rule: str
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate only the shards in ``keep`` ((K,) bool): the "exclude" answer.

    Answering from the unaffected shards alone exposes nothing (none of them holds data under
    a pending deletion). It equals the certified label whenever the instance is certified;
    otherwise it may differ from both the current and the post-deletion answer.
    Returns ((n,) labels, (n, C) scores) as :func:`~ray_unlearn.platform.core.aggregate.aggregate`.
    """
    probs = np.asarray(shard_probs)
    _check_3d(probs)
    mask = _mask(keep, probs.shape[0], name="keep")
    if not mask.any():
        raise ValueError("keep selects no shard: every shard is excluded, nothing can answer")
    return aggregate(probs[mask], rule)
