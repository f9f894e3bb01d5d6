"""The shard actors' OpenMP environment (train/executor.py ``actor_options``): threads that
sleep when idle (OMP_WAIT_POLICY=PASSIVE), which must not change what training computes."""

from __future__ import annotations

import os
import subprocess
import sys

from ray_unlearn.train.executor import actor_options
from ray_unlearn.train.worker_env import OMP_WAIT_POLICY

# Two stages of a Purchase-shaped MLP (600 features, 256 hidden, 100 classes, batch 128) at
# 2 threads: matmuls large enough that OpenMP splits them over both threads. Prints the
# SHA-256 of every stage's weights.
_TRAIN = """
import hashlib, numpy as np, torch
from ray_unlearn.platform.core.config import ModelConfig, TrainingConfig
from ray_unlearn.platform.core.training import ShardData, train_shard
rng = np.random.default_rng(0)
n = 1500
data = ShardData(0, np.arange(n, dtype=np.int64), (np.arange(n) % 2).astype(np.int32),
                 torch.from_numpy(rng.random((n, 600), dtype=np.float32)),
                 torch.from_numpy(rng.integers(0, 100, n)), 2)
tr = TrainingConfig(epochs=2, batch_size=128, torch_threads=2)
h = hashlib.sha256()
for st in train_shard(data, ModelConfig(kind="mlp", hidden=[256]), tr, seed=0,
                      feature_shape=(600,), num_classes=100):
    for k, v in sorted(st.state.items()):
        h.update(v.numpy().tobytes())
print(h.hexdigest())
"""


def _weights_digest(policy: str) -> str:
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", _TRAIN], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_shard_actors_threads_sleep_when_idle(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert OMP_WAIT_POLICY == "PASSIVE"
    for threads in (0, 2):
        env = actor_options(0.01, 0.0, threads)["runtime_env"]["env_vars"]
        assert env["OMP_WAIT_POLICY"] == "PASSIVE"


def test_a_policy_set_by_the_user_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    env = actor_options(0.01, 0.0, 2)["runtime_env"]["env_vars"]
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"}


def test_the_wait_policy_does_not_change_the_weights():
    """Exactness (a retrain equals training from scratch bit for bit) holds whichever policy
    trained the snapshot and whichever retrains from it."""
    passive = _weights_digest("PASSIVE")
    assert len(passive) == 64
    assert passive == _weights_digest("ACTIVE")
