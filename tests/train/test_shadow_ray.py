"""The Ray shadow trainer (train/shadow.py) gives the in-process shadows' confidences."""

from __future__ import annotations

import numpy as np
import pytest

from ray_unlearn.platform.core.config import ModelConfig, TrainingConfig
from ray_unlearn.platform.eval.lira import membership_matrix, shadow_confidences
from tests.conftest import random_label_shadows

pytestmark = pytest.mark.ray


def test_ray_shadows_equal_the_in_process_ones(ray_session):
    from ray_unlearn.train.shadow import shadow_confidences_ray

    trainer, x, y = random_label_shadows(
        48, 16, 4, ModelConfig(hidden=[16]), TrainingConfig(epochs=5, batch_size=16), seed=0
    )
    masks = membership_matrix(48, 3, seed=0)
    local = shadow_confidences(trainer, masks, x, y, "logits")
    remote = shadow_confidences_ray(trainer, masks, x, y, "logits", cpus_per_shadow=0.5)
    assert remote.shape == (3, 48)
    # one torch thread and seeds drawn from the masks: equal bit for bit, shadow for shadow
    np.testing.assert_array_equal(remote, local)
    assert not np.array_equal(remote[0], remote[1])
    with pytest.raises(ValueError, match="cpus_per_shadow must be > 0"):
        shadow_confidences_ray(trainer, masks, x, y, "logits", cpus_per_shadow=0)


def test_map_shadows_ray_equals_the_in_process_loop(ray_session):
    from ray_unlearn.train.shadow import map_shadows_ray

    trainer, x, y = random_label_shadows(
        32, 8, 3, ModelConfig(hidden=[8]), TrainingConfig(epochs=3, batch_size=16), seed=1
    )

    def fn(mask):  # two confidence vectors from one training, as HybridShadow gives; a local
        # function, so Ray's workers get it by value (this test module is not importable there)
        z = trainer(mask)(x)
        return {"a": z[:, 0], "b": z[:, 1] * mask}

    masks = membership_matrix(32, 3, seed=1)
    remote = map_shadows_ray(fn, masks, cpus_per_shadow=0.5)
    local = [fn(m) for m in masks]
    assert len(remote) == 3
    for r, lo in zip(remote, local, strict=True):  # in mask order, bit for bit
        assert set(r) == {"a", "b"}
        np.testing.assert_array_equal(r["a"], lo["a"])
        np.testing.assert_array_equal(r["b"], lo["b"])
    with pytest.raises(ValueError, match="bool"):
        map_shadows_ray(fn, masks.astype(int))


def test_shadow_tasks_threads_sleep_when_idle(ray_session, monkeypatch):
    """The runtime_env the tasks are given (train/worker_env.py) reaches their processes: this
    driver's own environment has no policy, so a worker could only have it from there."""
    from ray_unlearn.train.shadow import map_shadows_ray

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)

    def policy(mask):
        import os

        return os.environ.get("OMP_WAIT_POLICY")

    masks = membership_matrix(8, 2, seed=0)
    assert map_shadows_ray(policy, masks, cpus_per_shadow=0.5) == ["PASSIVE", "PASSIVE"]
