"""S3T on ``training.device``: its orders train, and its stage models serve, where the run's
setting resolves (as SISA's), with snapshots stored as CPU tensors and adapters seeded on the
CPU. Without a GPU the resolution is checked by pretending torch has one (the move to CUDA
then fails in torch's own CPU-only build, proving it was attempted); the CUDA runs
themselves are marked ``gpu`` and skip with the reason where no GPU exists."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ray_unlearn.platform.core import device as dev
from ray_unlearn.platform.core.config import ModelConfig
from ray_unlearn.platform.core.device import DeviceError, resolve_device
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.core.runtime import load_serving_model as core_serving_model
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.core.storage import StorageError
from ray_unlearn.platform.core.training import ShardData
from ray_unlearn.platform.methods.s3t.adapters import StageModel, init_adapter
from ray_unlearn.platform.methods.s3t.runtime import (
    BACKBONE,
    S3TShardRuntime,
    load_serving_model,
)
from ray_unlearn.platform.methods.s3t.training import (
    S3TConfig,
    check_s3t,
    model_for,
    pretrain_backbone,
    shard_data_from,
    train_order,
)
from tests.conftest import needs_cuda, sliced_shard_data, tiny_config

REAL_CUDA = torch.cuda.is_available()
S3T = [
    "unlearning.strategy=s3t",
    "model.hidden=[8,8,8]",
    "s3t.epochs=1",
    "s3t.pretrain_epochs=1",
    "s3t.budget=2",
]


# each test starts as a process Ray said nothing about
pytestmark = pytest.mark.usefixtures("no_ray_grant")


def _pretend_a_gpu(monkeypatch) -> None:
    """torch says a GPU is there (auto then resolves to cuda:0); no real CUDA work happens
    before a tensor is moved, which a CPU-only build refuses."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(dev, "configure_determinism", lambda d: None)


_NOT_COMPILED = r"(?i)cuda"  # torch's "Torch not compiled with CUDA enabled" (or a driver error)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny S3T run trained in process on the CPU (training.device=cpu)."""
    ctx = create_run(tiny_config(tmp_path_factory.mktemp("s3t-dev"), *S3T, "training.device=cpu"))
    train_all_shards(ctx)
    return ctx


def test_cuda_without_a_gpu_is_refused_before_anything_is_trained(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ctx = create_run(tiny_config(tmp_path, *S3T, "training.device=cuda"))
    with pytest.raises(DeviceError, match="training.device is 'cuda'"):
        train_all_shards(ctx)
    with pytest.raises(StorageError, match="no file"):  # not even the backbone was written
        ctx.model_store.manifest(BACKBONE)


def test_the_shard_runtime_trains_and_predicts_on_the_resolved_device(trained_run, monkeypatch):
    ctx = trained_run
    rt = S3TShardRuntime(ctx, 0)
    assert rt.device == torch.device("cpu") and rt.s3t.backbone.head.weight.device.type == "cpu"
    # every stored stage says where it trained (SISA's manifests do too)
    for e in ctx.model_store.registry().shards.values():
        assert all(ctx.model_store.manifest(v)["metrics"]["cuda"] == 0.0 for v in e.chain)

    monkeypatch.setattr(ctx.config.training, "device", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="training.device is 'cuda'"):
        S3TShardRuntime(ctx, 0)  # at load, not inside the first restore

    if REAL_CUDA:
        return  # the CUDA path itself: test_orders_train_and_serve_exactly_on_cuda
    _pretend_a_gpu(monkeypatch)
    for setting in ("cuda", "auto"):
        monkeypatch.setattr(ctx.config.training, "device", setting)
        with pytest.raises((AssertionError, RuntimeError), match=_NOT_COMPILED):
            S3TShardRuntime(ctx, 0)  # it moves the backbone to the GPU
    dev.declare_ray_gpus([])  # a Ray worker that asked for no GPU: auto is the CPU
    assert S3TShardRuntime(ctx, 0).device == torch.device("cpu")
    monkeypatch.setattr(ctx.config.training, "device", "cpu")
    dev._ray_gpus = None
    assert S3TShardRuntime(ctx, 0).device == torch.device("cpu")  # pinned to the CPU


@pytest.mark.skipif(REAL_CUDA, reason="pretends a GPU on a machine without one")
def test_in_process_training_goes_to_the_resolved_device(tmp_path, monkeypatch):
    _pretend_a_gpu(monkeypatch)
    ctx = create_run(tiny_config(tmp_path, *S3T, "training.device=auto"))
    with pytest.raises((AssertionError, RuntimeError), match=_NOT_COMPILED):
        train_all_shards(ctx)  # auto with a GPU: the backbone and orders go to CUDA


def test_serving_models_follow_the_serve_rule(trained_run, monkeypatch):
    ctx = trained_run
    vid = ctx.model_store.registry().shards[0].serving_version
    m = load_serving_model(ctx, vid)
    assert isinstance(m, StageModel)
    assert {t.device.type for t in m.tensors.values()} == {"cpu"}
    assert core_serving_model(ctx, vid, torch.device("cpu")) is not None  # .to(cpu): fine
    with pytest.raises(ValueError, match=r"shared backbone's device \(cpu\).*cannot move to meta"):
        m.to("meta")  # its backbone stays where it is: never a half-moved model
    if REAL_CUDA:
        return
    _pretend_a_gpu(monkeypatch)
    # a run trained with device cpu serves on the CPU even where a GPU is usable...
    assert load_serving_model(ctx, vid).base.head.weight.device.type == "cpu"
    # ...any other run on the GPU this process may use, as the Serve replicas do
    monkeypatch.setattr(ctx.config.training, "device", "auto")
    with pytest.raises((AssertionError, RuntimeError), match=_NOT_COMPILED):
        load_serving_model(ctx, vid)
    dev.declare_ray_gpus([])  # a replica granted no GPU: CPU, never an error
    monkeypatch.setattr(ctx.config.training, "device", "cuda")
    assert load_serving_model(ctx, vid).base.head.weight.device.type == "cpu"


def test_usable_device_never_fails_and_keeps_cpu_runs_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert {dev.usable_device(s).type for s in ("auto", "cpu", "cuda")} == {"cpu"}
    with pytest.raises(DeviceError, match="one of auto, cpu, cuda"):
        dev.usable_device("gpu")
    _pretend_a_gpu(monkeypatch)
    assert dev.usable_device("cpu") == torch.device("cpu")
    assert dev.usable_device("cuda") == dev.usable_device("auto") == torch.device("cuda", 0)
    dev.declare_ray_gpus([])  # granted none: the CPU, where resolve_device('cuda') would raise
    assert dev.usable_device("cuda") == torch.device("cpu")


def test_adapter_weights_are_drawn_on_the_cpu_whatever_the_slot_device():
    shapes = {"b.lora_A.s.weight": (2, 5), "b.lora_B.s.weight": (5, 2)}
    on_cpu = init_adapter({n: torch.empty(s) for n, s in shapes.items()}, seed=7)
    elsewhere = init_adapter({n: torch.empty(s, device="meta") for n, s in shapes.items()}, 7)
    for n in shapes:
        assert elsewhere[n].device.type == "cpu"
        assert torch.equal(elsewhere[n], on_cpu[n])
    assert on_cpu["b.lora_A.s.weight"].abs().sum() > 0 and not on_cpu["b.lora_B.s.weight"].any()


# -- on each device: training, exactness, snapshots, serving ---------------------------------

L = 3
CFG = S3TConfig(budget=1, epochs=2, pretrain_epochs=2, batch_size=8, lr=0.01, lora_rank=2)


def _data(per_slice: int = 10, seed: int = 0, shard: int = 0) -> ShardData:
    return sliced_shard_data(per_slice, seed, shard, L)


def _mlp_backbone(d: torch.device):
    pub = _data(seed=1, shard=99)
    return pretrain_backbone(
        ModelConfig(hidden=[6, 6, 6]),
        (5,),
        3,
        shard_data_from(pub.features, pub.labels, pub.sample_ids, 0x7FFE),
        CFG,
        seed=0,
        device=d,
    )


def _exactly_on(d: torch.device, backbone, data: ShardData) -> None:
    """Train one order on ``backbone`` (on ``d``), check its snapshots, its served models and
    that a stage never depends on later slices, bit for bit."""
    assert backbone.head.weight.device.type == d.type
    blocks = check_s3t(CFG, backbone, L)
    order = (2, 0, 1)
    probe = data.features[:7].to(d)
    outs = []

    def on_stage(snap, model):
        with torch.no_grad():
            outs.append(model(probe).clone())

    snaps = train_order(backbone, data, order, 0, CFG, seed=0, blocks=blocks, on_stage=on_stage)
    for s in snaps:  # checkpoints: CPU tensors, whatever trained them
        assert all(t.device.type == "cpu" and t.is_contiguous() for t in s.tensors().values())
        assert s.metrics["cuda"] == float(d.type == "cuda")
    # the stage-p model rebuilt from the CPU snapshots, on the device, is the live one bitwise
    for p in range(1, L + 1):
        with torch.no_grad():
            assert torch.equal(model_for(backbone, snaps, p)(probe), outs[p - 1])
    # deletion = deactivation is exact: trained again without the last slice's rows, the
    # stages before it are bitwise the same (every kernel deterministic on the device)
    again = train_order(
        backbone,
        data.without(data.sample_ids[data.slices == 1]),
        order,
        0,
        CFG,
        seed=0,
        blocks=blocks,
    )
    for a, b in zip(snaps[:2], again[:2], strict=True):
        assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    if d.type == "cuda":  # the same snapshots served from a CPU: float32 rounding only
        cpu_bb = copy.deepcopy(backbone).cpu()
        with torch.no_grad():
            served = model_for(cpu_bb, snaps, L)(probe.cpu())
        torch.testing.assert_close(served, outs[-1].cpu(), rtol=1e-4, atol=1e-5)


def test_orders_train_and_serve_exactly_on_the_cpu():
    d = resolve_device("cpu")
    _exactly_on(d, _mlp_backbone(d), _data())


@needs_cuda
def test_orders_train_and_serve_exactly_on_cuda():
    d = resolve_device("cuda")  # deterministic kernels on, as the run's processes do
    _exactly_on(d, _mlp_backbone(d), _data())


@needs_cuda
def test_transformer_orders_train_and_serve_exactly_on_cuda(tmp_path):
    """A tiny BERT (hf_encoder, LoRA on query/value): attention's backward included."""
    transformers = pytest.importorskip("transformers")
    from ray_unlearn.platform.core.models import build_model, text_encoder_of

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "green", "blue", "a", "b"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    bert = transformers.BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=L,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    transformers.BertModel(bert).save_pretrained(tmp_path)
    mcfg = ModelConfig(component="hf_encoder", args={"model": str(tmp_path), "max_length": 8})
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 10 * L)
    texts = [f"a {['red', 'green', 'blue'][y]} b {rng.choice(['a', 'b'])}" for y in labels]
    data = ShardData(
        0,
        np.arange(len(texts), dtype=np.int64),
        np.repeat(np.arange(L, dtype=np.int32), 10),
        torch.from_numpy(text_encoder_of(mcfg)(texts)),
        torch.from_numpy(labels.astype(np.int64)),
        L,
    )
    d = resolve_device("cuda")
    backbone = build_model(mcfg, (8,), 3).to(d).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    _exactly_on(d, backbone, data)
