"""Shared fixtures: tiny runs trained in-process, and one Ray session for the whole test run."""

from __future__ import annotations

import os

import pytest
import torch

from ray_unlearn.platform.core.config import load_config
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.core.training import train_shard

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")

# Small and quick: digits, 3 shards x 3 slices, 2 epochs.
TINY = ["training.epochs=2", "partition.shards=3", "partition.slices=3", "model.hidden=[32]"]


def tiny_config(tmp_path, *overrides: str):
    return load_config(
        os.path.join(CONFIGS, "digits.yaml"), [f"storage={tmp_path / 'store'}", *TINY, *overrides]
    )


def assert_equals_scratch(ctx, shard: int, deleted_ids) -> list:
    """The published model of ``shard`` is bitwise the shard trained from scratch without
    ``deleted_ids`` (same config and seed); returns the scratch stages (StageResult list)."""
    torch.set_num_threads(1)
    cfg = ctx.config
    scratch = train_shard(
        ctx.shard_data(shard, exclude=deleted_ids),
        cfg.model,
        cfg.training,
        seed=cfg.seed,
        feature_shape=ctx.feature_shape,
        num_classes=ctx.num_classes,
    )
    live = ctx.model_store.load_state(ctx.model_store.registry().shards[shard].chain[-1])
    assert all(torch.equal(live[n], scratch[-1].state[n]) for n in live)
    return scratch


@pytest.fixture
def tiny_run(tmp_path):
    """A trained tiny run (no Ray): returns its RunContext."""
    ctx = create_run(tiny_config(tmp_path))
    train_all_shards(ctx)
    return ctx


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for every integration test (ray.init takes ~5 s: start it once)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, namespace="ray_unlearn", log_to_driver=False)
    yield ray
    ray.shutdown()


# CUDA tests: marked `gpu` (benchmarks/gpu_check.sh runs `pytest -m gpu`) and skipped, with
# the reason, where there is no GPU.
_NO_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"needs a CUDA GPU (torch {torch.__version__}, CUDA available: no)",
)


def needs_cuda(test):
    return pytest.mark.gpu(_NO_CUDA(test))
