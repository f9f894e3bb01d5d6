"""Aggregating shard outputs: plurality vote of labels, or the mean of probabilities.

Ties are broken toward the smallest class index, in both rules, so an answer is a pure
function of the shard outputs (the ERASER certificates rely on the same tie-break).
"""

from __future__ import annotations

import numpy as np


def vote_counts(shard_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, n) int labels -> (n, classes) vote counts."""
    shard_labels = np.asarray(shard_labels)
    if shard_labels.ndim != 2:
        raise ValueError(f"shard_labels must be (shards, samples), got shape {shard_labels.shape}")
    k, n = shard_labels.shape
    counts = np.zeros((n, num_classes), dtype=np.int64)
    np.add.at(counts, (np.broadcast_to(np.arange(n), (k, n)), shard_labels), 1)
    return counts


def plurality_vote(shard_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, n) -> (n,) the most voted label; ties go to the smallest label."""
    return vote_counts(shard_labels, num_classes).argmax(axis=1)  # argmax returns the first max


def mean_probability(shard_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, n, classes) -> ((n,) labels, (n, classes) mean probabilities)."""
    shard_probs = np.asarray(shard_probs)
    if shard_probs.ndim != 3:
        raise ValueError(
            f"shard_probs must be (shards, samples, classes), got shape {shard_probs.shape}"
        )
    mean = shard_probs.mean(axis=0)
    return mean.argmax(axis=1), mean


def aggregate(shard_probs: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate (K, n, classes) shard probabilities by ``rule`` ('vote' or 'mean_prob').

    Returns (labels, per-class scores): vote fractions for 'vote', mean probabilities for
    'mean_prob'.
    """
    shard_probs = np.asarray(shard_probs)
    if shard_probs.shape[0] == 0:
        raise ValueError("no shard model to aggregate: every shard is empty")
    if rule == "vote":
        counts = vote_counts(shard_probs.argmax(axis=2), shard_probs.shape[2])
        return counts.argmax(axis=1), counts / shard_probs.shape[0]
    if rule == "mean_prob":
        return mean_probability(shard_probs)
    raise ValueError(f"unknown aggregation rule {rule!r}; allowed: 'vote', 'mean_prob'")
