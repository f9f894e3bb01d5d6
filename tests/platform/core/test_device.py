"""training.device and the GPU resources a run asks Ray for, checked without a GPU; the CUDA
paths themselves run where a GPU exists (tests marked ``gpu`` skip with the reason else)."""

from __future__ import annotations

import os

import pytest
import torch

from ray_unlearn.platform.core import device as dev
from ray_unlearn.platform.core.config import ConfigError, config_to_yaml
from ray_unlearn.platform.core.device import DeviceError, resolve_device
from tests.conftest import needs_cuda, tiny_config

# each test starts as a process Ray said nothing about
pytestmark = pytest.mark.usefixtures("no_ray_grant")


def _cuda(monkeypatch, available: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_cpu_is_cpu_and_auto_without_cuda_is_cpu(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    _cuda(monkeypatch, False)
    assert resolve_device("auto") == torch.device("cpu")


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    _cuda(monkeypatch, False)
    with pytest.raises(DeviceError, match=r"training.device is 'cuda' but .*auto.*cpu"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="one of auto, cpu, cuda"):
        resolve_device("gpu")


def test_auto_uses_cuda_only_where_ray_granted_a_gpu(monkeypatch):
    _cuda(monkeypatch, True)
    monkeypatch.setattr(dev, "configure_determinism", lambda d: None)  # no real CUDA here
    dev.declare_ray_gpus([])  # a Ray worker that asked for no GPU, on a GPU machine
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="Ray gave this worker no GPU.*gpus_per_worker"):
        resolve_device("cuda")
    dev.declare_ray_gpus(["0"])
    assert resolve_device("auto") == torch.device("cuda", 0)
    dev._ray_gpus = None  # no Ray at all: torch decides
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_config_device_and_resources(tmp_path):
    cfg = tiny_config(tmp_path)
    assert cfg.training.device == "auto"
    assert cfg.resources.gpus_per_worker == 0 and cfg.serving.gpus_per_replica == 0
    cfg = tiny_config(tmp_path, "resources.gpus_per_worker=0.25", "serving.gpus_per_replica=1")
    assert cfg.resources.gpus_per_worker == 0.25 and cfg.serving.gpus_per_replica == 1
    with pytest.raises(ConfigError, match=r"training.device.*'auto', 'cpu' or 'cuda'"):
        tiny_config(tmp_path, "training.device=gpu")
    with pytest.raises(ConfigError, match="gpus_per_worker.*training.device=cpu never uses"):
        tiny_config(tmp_path, "training.device=cpu", "resources.gpus_per_worker=1")
    with pytest.raises(ConfigError, match="resources.gpus_per_worker"):
        tiny_config(tmp_path, "resources.gpus_per_worker=-1")


def test_train_job_scaling_asks_for_gpus_from_config(tmp_path, monkeypatch):
    from ray_unlearn.train import job, session

    assert job.scaling_options(4, 0.5, 0.0) == {
        "num_workers": 4,
        "use_gpu": False,
        "resources_per_worker": {"CPU": 0.5},
    }
    assert job.scaling_options(4, 0.5, 0.25) == {
        "num_workers": 4,
        "use_gpu": True,
        "resources_per_worker": {"CPU": 0.5, "GPU": 0.25},
    }
    # the options really build a ScalingConfig (Ray checks use_gpu against the GPU key)
    sc = job.ScalingConfig(**job.scaling_options(2, 1.0, 0.5))
    assert sc.use_gpu and sc.num_gpus_per_worker == 0.5

    cuda_no_gpus = tiny_config(tmp_path, "training.device=cuda")
    with pytest.raises(ValueError, match="resources.gpus_per_worker > 0"):
        job.check_gpu_request(cuda_no_gpus)
    # 3 shards x 0.5 GPU = 1.5 GPUs: refused on a 1-GPU cluster, fine on a 2-GPU one
    asks = tiny_config(tmp_path, "resources.gpus_per_worker=0.5")
    monkeypatch.setattr(session.ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    with pytest.raises(ValueError, match=r"needs 1.5 GPU\(s\), the Ray cluster has 1"):
        job.check_gpu_request(asks, against_cluster=True)
    monkeypatch.setattr(session.ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ValueError, match="the Ray cluster has no GPU"):
        job.check_gpu_request(asks, against_cluster=True)
    monkeypatch.setattr(session.ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 2.0})
    job.check_gpu_request(asks, against_cluster=True)
    job.check_gpu_request(
        tiny_config(tmp_path), against_cluster=True
    )  # CPU runs never look at the cluster


def test_shard_actors_and_serve_replicas_ask_for_gpus_from_config(monkeypatch):
    from ray_unlearn.serve.app import shard_actor_options
    from ray_unlearn.train.executor import actor_options

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}  # tests/train/test_executor_env.py
    assert actor_options(0.01, 0.0) == {"num_cpus": 0.01, "runtime_env": {"env_vars": passive}}
    assert actor_options(0.01, 0.5) == {
        "num_cpus": 0.01,
        "num_gpus": 0.5,
        "runtime_env": {"env_vars": passive},
    }
    # Ray would set OMP_NUM_THREADS=1 in a worker reserving under a CPU: the run's threads
    assert actor_options(0.01, 0.0, 2) == {
        "num_cpus": 0.01,
        "runtime_env": {"env_vars": {**passive, "OMP_NUM_THREADS": "2"}},
    }
    assert shard_actor_options(0.1, 0) == {"num_cpus": 0.1, "runtime_env": {"env_vars": passive}}
    assert shard_actor_options(0.1, 1) == {
        "num_cpus": 0.1,
        "num_gpus": 1.0,
        "runtime_env": {"env_vars": passive},
    }
    with pytest.raises(ValueError, match="gpus_per_replica.*>= 0"):
        shard_actor_options(0.1, -1)


def test_build_app_takes_the_runs_serving_gpus(tiny_run):
    from ray_unlearn.serve.app import build_app

    tiny_run.config.serving.gpus_per_replica = 0.5
    tiny_run.storage.write_bytes(tiny_run.layout.config, config_to_yaml(tiny_run.config).encode())
    args = {"storage": tiny_run.storage.uri, "run_id": tiny_run.run_id}

    def shard_options(app):
        handles = app._bound_deployment.init_args[1:]
        return [h._bound_deployment.ray_actor_options for h in handles]

    opts = shard_options(build_app(args))
    assert len(opts) == 3 and all(o["num_gpus"] == 0.5 for o in opts)
    opts = shard_options(build_app({**args, "shard_gpus": 0}))
    assert all(o.get("num_gpus", 0) == 0 for o in opts)


def test_cpu_training_snapshots_are_cpu_tensors(tmp_path):
    from ray_unlearn.platform.core.run import create_run
    from ray_unlearn.platform.core.training import train_run_shard

    ctx = create_run(tiny_config(tmp_path, "training.device=cpu"))
    st = next(train_run_shard(ctx, 0))
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in st.state.values())
    assert st.metrics["cuda"] == 0.0


# -- on a GPU --------------------------------------------------------------------------------


@needs_cuda
def test_cuda_turns_deterministic_kernels_on():
    d = resolve_device("cuda")
    assert d.type == "cuda"
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")


@needs_cuda
def test_cuda_training_snapshots_load_anywhere_and_predict_on_cpu(tmp_path):
    from ray_unlearn.platform.core.models import build_model
    from ray_unlearn.platform.core.run import create_run
    from ray_unlearn.platform.core.training import predict_proba, train_run_shard

    ctx = create_run(tiny_config(tmp_path, "training.device=cuda"))
    st = next(train_run_shard(ctx, 0))
    assert all(t.device.type == "cpu" for t in st.state.values())  # device-independent
    assert st.metrics["cuda"] == 1.0  # it did run on the GPU
    model = build_model(ctx.config.model, ctx.feature_shape, ctx.num_classes)
    model.load_state_dict(st.state)
    x = ctx.shard_data(0).features[:16]
    p_cpu = predict_proba(model, x)
    p_gpu = predict_proba(model.to("cuda"), x)
    assert p_gpu.device.type == "cpu"
    # the same weights on two devices: equal up to float32 rounding of different kernels
    torch.testing.assert_close(p_gpu, p_cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hw", [(8, 8), (10, 6)])
def test_cnn_pooling_is_adaptive_pooling_bit_for_bit(hw):
    # the built-in CNN pools with AvgPool2d(2) on even sizes (deterministic on CUDA); it must
    # compute exactly what the adaptive pooling it replaced computed, forward and backward
    from torch import nn

    from ray_unlearn.platform.core.models import SmallCNN

    torch.manual_seed(0)
    net = SmallCNN((1, *hw), [4], 3)
    assert isinstance(net.body[-1], nn.AvgPool2d)
    ref = SmallCNN((1, *hw), [4], 3)
    ref.load_state_dict(net.state_dict())
    ref.body[-1] = nn.AdaptiveAvgPool2d((hw[0] // 2, hw[1] // 2))
    x = torch.randn(5, hw[0] * hw[1])
    a, b = net(x), ref(x)
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    assert all(
        torch.equal(p.grad, q.grad) for p, q in zip(net.parameters(), ref.parameters(), strict=True)
    )
    assert isinstance(SmallCNN((1, 7, 7), [4], 3).body[-1], nn.AdaptiveAvgPool2d)  # odd: as before


def test_train_refuses_cuda_without_gpus_before_writing(tmp_path):
    from ray_unlearn.api import train  # (ray_unlearn.train is also the subpackage's name)

    with pytest.raises(ValueError, match="resources.gpus_per_worker > 0"):
        train(
            os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "digits.yaml"),
            ["training.device=cuda"],
            storage=str(tmp_path / "store"),
        )
    assert not (tmp_path / "store").exists()  # nothing written, no Ray started
