"""A user's own model, defined here and loaded by its import path
(``tests.platform.core.test_user_model:build``): config errors, then a SISA run that trains,
forgets (the retrained shard equals one trained from scratch, byte for byte), serves and
audits, and an S3T run whose LoRA blocks and head are named by config."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from ray_unlearn.platform.core.aggregate import aggregate
from ray_unlearn.platform.core.audit import audit
from ray_unlearn.platform.core.config import ConfigError, config_from_dict, config_to_yaml
from ray_unlearn.platform.core.deletion_log import RequestState
from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
from ray_unlearn.platform.core.models import (
    build_model,
    calibration_parameter_names,
    check_model,
    impure_modules,
    parts_of,
)
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.methods.s3t.training import S3TConfigError
from tests.conftest import assert_equals_scratch, tiny_config

COMPONENT = "tests.platform.core.test_user_model:build"


class Net(nn.Module):
    """Residual tanh blocks with LayerNorm (per-sample, so still a pure function of the
    weights and the input) and an output layer called ``classifier``."""

    def __init__(self, in_features: int, width: int, depth: int, num_classes: int, p: float):
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(p)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, classes)
        h = torch.tanh(self.stem(x.flatten(1)))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.classifier(self.drop(self.norm(h)))


def build(
    feature_shape, num_classes: int, width: int = 16, depth: int = 3, dropout: float = 0.0
) -> nn.Module:
    return Net(math.prod(feature_shape), width, depth, num_classes, dropout)


def not_a_module(feature_shape, num_classes: int) -> str:
    return "a model"


def _config(tmp_path, model: dict, *overrides: str):
    """The tiny digits config with its ``model`` section replaced (a user's YAML would
    simply hold this section)."""
    tree = tiny_config(tmp_path, *overrides).model_dump(mode="json")
    tree["model"] = model
    return config_from_dict(tree)


USER = {"component": COMPONENT, "args": {"width": 16}, "parts": {"head": "classifier"}}


# -- config and run-creation errors ----------------------------------------------------------


def test_component_errors_name_the_component_and_what_is_allowed(tmp_path):
    cases = {
        "tests.platform.core.no_such_module:build": "cannot import module",
        "tests.platform.core.test_user_model:missing": "has no attribute 'missing'",
        "tests.platform.core.test_user_model": "is not a built-in (mlp, cnn, hf_encoder) or an import path",
    }
    for component, why in cases.items():
        with pytest.raises(ConfigError, match=re.escape(why)) as err:
            _config(tmp_path, {"component": component})
        assert repr(component) in str(err.value)
    with pytest.raises(ConfigError, match="cannot take model.args \\['heads'\\]"):
        _config(tmp_path, {"component": COMPONENT, "args": {"heads": 2}})
    with pytest.raises(ConfigError, match="short form of model.component"):
        _config(tmp_path, {"component": COMPONENT, "hidden": [8]})

    cfg = _config(tmp_path, {"component": f"{__name__}:not_a_module"})
    with pytest.raises(ConfigError, match="returned a str; a model component must return"):
        build_model(cfg.model, (64,), 10)
    cfg = _config(tmp_path, {"component": COMPONENT, "args": {"width": -1}})
    with pytest.raises(ConfigError, match=f"model.component '{COMPONENT}' failed"):
        build_model(cfg.model, (64,), 10)


def test_run_creation_refuses_a_model_that_breaks_an_assumption(tmp_path):
    dropout = {**USER, "args": {"dropout": 0.1}}
    with pytest.raises(ConfigError, match=r"pure function .* drop \(Dropout\(p=0.1\)"):
        create_run(_config(tmp_path, dropout))
    with pytest.raises(ConfigError, match="model.parts.head: 'head' is not a module"):
        create_run(_config(tmp_path, {"component": COMPONENT}))
    missing = {**USER, "parts": {"head": "classifier", "blocks": ["blocks.3"]}}
    with pytest.raises(ConfigError, match="model.parts.blocks: 'blocks.3' is not a module"):
        create_run(_config(tmp_path, missing))
    # refused before anything of a run is stored (only the bundled data set's cache)
    assert {p.name for p in (tmp_path / "store").iterdir()} <= {"datasets"}

    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    assert impure_modules(bn) == ["1 (BatchNorm1d: batch statistics)"]
    assert impure_modules(nn.Sequential(nn.Dropout(0.0), nn.InstanceNorm1d(4))) == []
    net = check_model(_config(tmp_path, USER).model, (64,), 10)
    # loaded by its import path (pytest imports this file under another module name)
    assert type(net).__module__ == "tests.platform.core.test_user_model"
    assert type(net).__name__ == "Net"


def test_parts_default_to_the_builtins_body_and_head(tmp_path):
    mlp = build_model(tiny_config(tmp_path).model, (64,), 10)
    assert parts_of(mlp).head == "head" and parts_of(mlp).blocks == ("body.0",)
    assert calibration_parameter_names(mlp, "body") == ["body.0.weight", "body.0.bias"]
    assert calibration_parameter_names(mlp, "head") == ["head.weight", "head.bias"]

    user = {**USER, "parts": {"head": "classifier", "body": ["blocks", "norm"]}}
    net = build_model(_config(tmp_path, user).model, (64,), 10)
    assert calibration_parameter_names(net, "head") == ["classifier.weight", "classifier.bias"]
    assert calibration_parameter_names(net, "body") == [
        *(f"blocks.{i}.{w}" for i in range(3) for w in ("weight", "bias")),
        "norm.weight",
        "norm.bias",
    ]
    assert parts_of(net).blocks is None  # a user component names its own


def test_short_form_dumps_as_before_and_a_component_round_trips(tmp_path):
    # the stored config (and so the run's config digest) of a `kind` config is unchanged
    assert tiny_config(tmp_path).model_dump(mode="json")["model"] == {
        "kind": "mlp",
        "hidden": [32],
        "channels": [16, 32],
    }
    cfg = _config(tmp_path, USER)
    parts = {"head": "classifier", "body": None, "blocks": None}
    assert cfg.model_dump(mode="json")["model"] == {**USER, "parts": parts}
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg
    builtin = _config(tmp_path, {"component": "cnn", "args": {"channels": [4]}}).model
    assert type(build_model(builtin, (1, 8, 8), 10)).__name__ == "SmallCNN"


# -- a whole run with the user's model -------------------------------------------------------


def test_user_model_trains_forgets_exactly_serves_and_audits(tmp_path):
    ctx = create_run(_config(tmp_path, USER))
    cfg = ctx.config  # as stored: training.torch_threads pinned (bitwise needs the same count)
    train_all_shards(ctx)
    state = ctx.model_store.load_state(ctx.model_store.registry().serving_versions()[0])
    assert "classifier.weight" in state and "blocks.2.weight" in state  # the user's model

    owners = np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])
    owner = str(owners[2])
    ids = ctx.plan.samples_of_owner(owner)
    assert audit(ctx, owner_id=owner)["live_versions_containing"]
    rec = UnlearningEngine(ctx, LocalShards(ctx)).forget(owner_id=owner, request_id="u-1")
    assert rec.state == RequestState.DONE

    (shard,) = {int(k) for k in ctx.plan.locate(ids)[0] if k != TEST}
    # the run's resolved config (create_run pins training.torch_threads: results are
    # bitwise reproducible for a fixed thread count only)
    scratch = assert_equals_scratch(ctx, shard, ids)
    live = ctx.model_store.load_state(ctx.model_store.registry().shards[shard].chain[-1])
    assert live.keys() == scratch[-1].state.keys()

    after = audit(ctx, owner_id=owner)
    assert after["live_versions_containing"] == {} and after["clean"]

    test = ctx.split_records("test")
    probs = LocalShards(ctx).predict_proba(test.features)  # (n, D) rows, as the gateway sends
    assert sorted(probs) == list(range(cfg.partition.shards))
    labels, _ = aggregate(np.stack([probs[k] for k in sorted(probs)]), "vote")
    assert (labels == test.labels).mean() > 0.5  # 10 classes: chance is 0.1


def test_s3t_with_a_user_model_whose_blocks_are_named_by_config(tmp_path):
    s3t = [
        "unlearning.strategy=s3t",
        "s3t.epochs=1",
        "s3t.pretrain_epochs=1",
        "s3t.budget=1",
        "partition.shards=2",
    ]
    # refused at run creation (the method's own model check), before anything is stored
    with pytest.raises(S3TConfigError, match="no block list: .*model.parts.blocks"):
        create_run(_config(tmp_path / "a", USER, *s3t))
    assert not any((tmp_path / "a").rglob("run.json"))

    blocks = ["blocks.0", "blocks.1", "blocks.2"]
    named = {**USER, "parts": {"head": "classifier", "blocks": blocks}}
    ctx = create_run(_config(tmp_path / "b", named, *s3t))
    train_all_shards(ctx)
    store = ctx.model_store
    entry = store.registry().shards[0]
    manifests = [store.manifest(v) for v in entry.chain]
    # stage i adapts block i from the top, as with the built-ins' body layers
    assert [m["block"] for m in manifests] == blocks[::-1]
    stage = store.load_state(entry.chain[0])
    assert {k for k in stage if k.startswith("classifier.")} == {
        "classifier.weight",
        "classifier.bias",
    }
    assert all("lora_" in k for k in stage if not k.startswith("classifier."))

    owners = np.unique(ctx.plan.owner_ids[ctx.plan.shards == 0])
    from ray_unlearn.platform.methods.s3t.runtime import public_sample_ids

    public = set(public_sample_ids(ctx).tolist())
    owner = next(str(o) for o in owners if not set(ctx.plan.samples_of_owner(o).tolist()) & public)
    rec = UnlearningEngine(ctx, LocalShards(ctx)).forget(owner_id=owner, request_id="s-1")
    assert rec.state == RequestState.DONE
    assert audit(ctx, owner_id=owner)["clean"]
    from ray_unlearn.platform.eval.accuracy import serving_accuracy

    assert 0.0 <= serving_accuracy(ctx) <= 1.0
