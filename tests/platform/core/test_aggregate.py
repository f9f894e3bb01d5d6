"""Aggregation rules against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from ray_unlearn.platform.core.aggregate import (
    aggregate,
    mean_probability,
    plurality_vote,
    vote_counts,
)


def test_plurality_vote_and_tie_break_to_smallest_label():
    labels = np.array([[0, 2, 1], [1, 2, 1], [1, 0, 2], [0, 0, 2]])  # 4 shards, 3 samples
    assert vote_counts(labels, 3).tolist() == [[2, 2, 0], [2, 0, 2], [0, 2, 2]]
    assert plurality_vote(labels, 3).tolist() == [0, 0, 1]  # every column ties: smallest wins
    assert plurality_vote(np.array([[2], [2], [1]]), 3).tolist() == [2]


def test_mean_probability_hand_values():
    probs = np.array([[[0.6, 0.4]], [[0.1, 0.9]], [[0.5, 0.5]]])
    labels, mean = mean_probability(probs)
    assert labels.tolist() == [1]
    assert np.allclose(mean, [[0.4, 0.6]])


def test_vote_and_mean_can_disagree():
    probs = np.array([[[0.51, 0.49]], [[0.51, 0.49]], [[0.0, 1.0]]])
    assert aggregate(probs, "vote")[0].tolist() == [0]
    assert aggregate(probs, "mean_prob")[0].tolist() == [1]
    assert np.allclose(aggregate(probs, "vote")[1], [[2 / 3, 1 / 3]])


def test_bad_inputs():
    with pytest.raises(ValueError, match="allowed: 'vote', 'mean_prob'"):
        aggregate(np.zeros((1, 1, 2)), "median")
    with pytest.raises(ValueError, match="every shard is empty"):
        aggregate(np.zeros((0, 3, 2)), "vote")
    with pytest.raises(ValueError, match="shards, samples"):
        vote_counts(np.zeros(3, int), 2)
