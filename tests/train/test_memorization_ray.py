"""Feldman's estimator fanned out as Ray tasks equals the in-process estimator."""

from __future__ import annotations

import numpy as np
import pytest

from ray_unlearn.platform.methods.rum.memorization import exact_memorization
from tests.platform.methods.rum.test_memorization import SPEC, blobs

pytestmark = pytest.mark.ray


def test_ray_estimator_equals_the_serial_one(ray_session):
    from ray_unlearn.train.memorization import exact_memorization_ray

    x, y = blobs(n=120, flip=10)
    serial = exact_memorization(SPEC, x, y, models=3, keep=0.6, seed=4)
    fanned = exact_memorization_ray(SPEC, x, y, models=3, keep=0.6, seed=4)
    np.testing.assert_array_equal(serial, fanned)
    with pytest.raises(ValueError, match="models must be >= 2"):
        exact_memorization_ray(SPEC, x, y, models=0)


def test_subset_runs_in_batches_give_the_serial_estimator(ray_session):
    from ray_unlearn.platform.methods.rum.memorization import memorization_from_runs
    from ray_unlearn.train.memorization import subset_runs_ray

    x, y = blobs(n=120, flip=10)
    first = subset_runs_ray(SPEC, x, y, [0, 1], keep=0.6, seed=4)
    more = subset_runs_ray(SPEC, x, y, [2], keep=0.6, seed=4)
    masks, correct = (np.concatenate([a, b]) for a, b in zip(first[:2], more[:2], strict=True))
    serial = exact_memorization(SPEC, x, y, models=3, keep=0.6, seed=4)
    np.testing.assert_array_equal(memorization_from_runs(masks, correct), serial)
    assert first[2].shape == (2,) and (first[2] > 0).all()  # CPU seconds per model
    with pytest.raises(ValueError, match="at least one"):
        subset_runs_ray(SPEC, x, y, [])


def test_run_scores_with_the_estimator_on_ray(ray_session, tmp_path):
    from ray_unlearn.platform.core.run import create_run
    from ray_unlearn.platform.methods.rum.memorization import load_scores
    from ray_unlearn.train.memorization import compute_run_scores_ray
    from tests.conftest import tiny_config

    ctx = create_run(tiny_config(tmp_path))
    cost = compute_run_scores_ray(ctx, ["exact"], models=2)
    ids, mem = load_scores(ctx, "exact")
    assert list(cost) == ["exact"] and len(ids) == ctx.info["num_train"]
    assert np.nanmax(np.abs(mem)) <= 1
