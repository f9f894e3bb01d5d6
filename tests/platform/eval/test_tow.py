"""Unlearning quality against the retrained reference: ToW, ToW-MIA, seed intervals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_unlearn.platform.eval.tow import quality, seed_interval, tow
from ray_unlearn.platform.methods.rum.unlearn import RumPlan, rum_unlearn


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained():
    from tests.platform.methods.test_approximate import memorized_model

    return memorized_model()


def test_tow_and_tow_mia_against_the_reference(trained):
    model, forget, retain = trained
    assert tow(0.1, -0.2, 0.0) == pytest.approx(0.9 * 0.8)
    same = quality(model, model, forget, retain, retain)
    assert same["tow"] == 1.0 and same["tow_mia"] == 1.0
    out = rum_unlearn(model, forget, retain, np.linspace(0, 1, 20), RumPlan("confidence"))
    q = quality(out, model, forget, retain, retain)
    d = [abs(q[f"model_accuracy_{s}"] - q[f"reference_accuracy_{s}"]) for s in ("forget", "retain")]
    assert q["tow"] == pytest.approx((1 - d[0]) * (1 - d[1]) ** 2)  # retain doubles as test
    assert q["tow"] < 1  # forgetting moved the forget accuracy away from the original's


def test_seed_interval_by_hand():
    s = seed_interval([1.0, 2.0, 3.0])
    # sd 1, t(0.975, 2) = 4.3027, half width 4.3027 / sqrt(3)
    assert s["mean"] == 2.0 and s["sd"] == pytest.approx(1.0)
    assert s["ci95_high"] - 2.0 == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
    assert seed_interval([0.5])["ci95_low"] == 0.5
    with pytest.raises(ValueError, match="at least one"):
        seed_interval([])
