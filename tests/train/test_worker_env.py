"""Every Ray process that runs torch gets sleeping OpenMP threads (train/worker_env.py): the
options each launcher builds, read without starting Ray (Ray's own calls are replaced by
recorders that stop at the first launch)."""

from __future__ import annotations

import numpy as np
import pytest

from ray_unlearn.train import job, memorization, shadow
from ray_unlearn.train.worker_env import OMP_WAIT_POLICY, torch_env_vars, torch_runtime_env
from tests.conftest import tiny_config

PASSIVE = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}


class Launched(Exception):
    """Raised by a recorder in place of Ray's launch: the options were built."""


class Recorder:
    """Stands for a ``@ray.remote`` function, or for ``TorchTrainer``: records the options,
    then raises :class:`Launched` where Ray would start a process."""

    def __init__(self):
        self.options_seen: list[dict] = []

    def options(self, **kw):
        self.options_seen.append(kw)
        return self

    def remote(self, *args):
        raise Launched

    def __call__(self, *args, **kw):  # TorchTrainer(...)
        self.options_seen.append(kw)
        return self

    def fit(self):
        raise Launched


@pytest.fixture(autouse=True)
def _no_policy(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)


def test_the_env_sleeps_and_sets_known_threads():
    assert OMP_WAIT_POLICY == "PASSIVE"
    assert torch_env_vars() == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert torch_env_vars(3) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
    assert torch_runtime_env() == PASSIVE


def test_a_policy_set_by_the_user_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert torch_runtime_env(2) == {
        "env_vars": {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"}
    }
    monkeypatch.delenv("OMP_WAIT_POLICY")
    base = {"working_dir": "gcs://x.zip", "env_vars": {"OMP_NUM_THREADS": "4", "A": "1"}}
    assert torch_runtime_env(2, base=base) == {  # a job's runtime_env: its variables win
        "working_dir": "gcs://x.zip",
        "env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "4", "A": "1"},
    }


def test_ray_train_workers_get_it_with_the_runs_threads(tmp_path, monkeypatch):
    from ray_unlearn.platform.core.run import create_run

    ctx = create_run(tiny_config(tmp_path, "training.torch_threads=2"))
    trainer = Recorder()
    monkeypatch.setattr(job, "TorchTrainer", trainer)
    monkeypatch.setattr(job.ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(Launched):
        job.run_training(ctx)
    (kw,) = trainer.options_seen
    assert kw["run_config"].worker_runtime_env == {
        "env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2"}
    }


def test_shadow_and_memorization_tasks_get_it(monkeypatch):
    monkeypatch.setattr(shadow.ray, "put", lambda x: x)  # the same module object as ray
    masks = np.ones((2, 4), dtype=bool)
    y = np.zeros(4, dtype=np.int64)
    for name, call in [
        ("_shadow", lambda: shadow.shadow_confidences_ray(None, masks, y, y, cpus_per_shadow=0.5)),
        ("_call", lambda: shadow.map_shadows_ray(None, masks, cpus_per_shadow=0.5)),
    ]:
        task = Recorder()
        monkeypatch.setattr(shadow, name, task)
        with pytest.raises(Launched):
            call()
        assert task.options_seen == [{"num_cpus": 0.5, "runtime_env": PASSIVE}], name
    x = np.zeros((4, 2), dtype=np.float32)
    for name, call in [
        ("_one", lambda: memorization.exact_memorization_ray(None, x, y, models=2)),
        ("_timed", lambda: memorization.subset_runs_ray(None, x, y, [0])),
    ]:
        task = Recorder()
        monkeypatch.setattr(memorization, name, task)
        with pytest.raises(Launched):
            call()
        assert task.options_seen == [{"runtime_env": PASSIVE}], name


def test_serve_replicas_get_it(tiny_run):
    from ray_unlearn.serve.app import build_app, shard_actor_options

    assert shard_actor_options(0.1, 0) == {"num_cpus": 0.1, "runtime_env": PASSIVE}
    assert shard_actor_options(0.1, 1) == {"num_cpus": 0.1, "num_gpus": 1.0, "runtime_env": PASSIVE}
    app = build_app({"storage": tiny_run.storage.uri, "run_id": tiny_run.run_id})
    gateway = app._bound_deployment
    # the gateway keeps its own CPU sliver (options() replaces the decorator's dict)
    assert gateway.ray_actor_options == {"num_cpus": 0.1, "runtime_env": PASSIVE}
    shards = [h._bound_deployment.ray_actor_options for h in gateway.init_args[1:]]
    assert len(shards) == 3 and all(o["runtime_env"] == PASSIVE for o in shards)


def test_serve_replicas_keep_the_deploying_jobs_runtime_env(monkeypatch):
    """serve.run gives a deployment with its own runtime_env only the job's working_dir, so
    the job's pip / env_vars are carried over here; a policy the job sets is the user's."""
    import ray

    from ray_unlearn.serve import app

    job_env = {"pip": ["ray-unlearn"], "env_vars": {"RAY_UNLEARN_API_TOKEN": "t"}}

    class Context:
        runtime_env = job_env

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context)
    assert app.replica_runtime_env() == {
        "pip": ["ray-unlearn"],
        "env_vars": {"RAY_UNLEARN_API_TOKEN": "t", "OMP_WAIT_POLICY": "PASSIVE"},
    }
    assert app.shard_actor_options(0.1, 0)["runtime_env"] == app.replica_runtime_env()
    job_env["env_vars"]["OMP_WAIT_POLICY"] = "ACTIVE"
    assert app.gateway_actor_options()["runtime_env"]["env_vars"]["OMP_WAIT_POLICY"] == "ACTIVE"
    assert job_env == {  # read, never changed
        "pip": ["ray-unlearn"],
        "env_vars": {"RAY_UNLEARN_API_TOKEN": "t", "OMP_WAIT_POLICY": "ACTIVE"},
    }
