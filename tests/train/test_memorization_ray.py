"""Feldman's estimator fanned out as Ray tasks equals the in-process estimator."""

from __future__ import annotations

import numpy as np
import pytest

from ray_unlearn.platform.memorization import exact_memorization
from tests.platform.test_memorization import SPEC, blobs

pytestmark = pytest.mark.ray


def test_ray_estimator_equals_the_serial_one(ray_session):
    from ray_unlearn.train.memorization import exact_memorization_ray

    x, y = blobs(n=120, flip=10)
    serial = exact_memorization(SPEC, x, y, models=3, keep=0.6, seed=4)
    fanned = exact_memorization_ray(SPEC, x, y, models=3, keep=0.6, seed=4)
    np.testing.assert_array_equal(serial, fanned)
    with pytest.raises(ValueError, match="models must be >= 2"):
        exact_memorization_ray(SPEC, x, y, models=0)
