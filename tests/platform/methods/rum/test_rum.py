"""RUM: memorization groups, per-group algorithms, and the ``rum`` strategy (its quality
measures are tested in tests/platform/eval/test_tow.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ray_unlearn.platform.methods.rum.unlearn as rum
from ray_unlearn.platform.core.config import ConfigError
from ray_unlearn.platform.methods.rum.unlearn import RumPlan, rum_unlearn, split_groups
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_groups_follow_each_scores_direction():
    conf = np.array([0.9, 0.1, 0.5, 0.95, 0.2, 0.6])
    g = split_groups("confidence", conf)  # high confidence = low memorization
    assert set(g["low"]) == {0, 3} and set(g["medium"]) == {2, 5} and set(g["high"]) == {1, 4}
    g = split_groups("entropy", conf)  # high entropy = high memorization
    assert set(g["low"]) == {1, 4} and set(g["high"]) == {0, 3}
    g = split_groups("exact", np.array([0.1, np.nan, 0.5]))  # no estimate: treated as high
    assert list(g["high"]) == [1]


@pytest.fixture(scope="module")
def trained():
    from tests.platform.methods.test_approximate import memorized_model

    return memorized_model()


def test_rum_runs_each_group_with_its_algorithm_in_order(trained, monkeypatch):
    model, forget, retain = trained
    calls = []
    real = rum.unlearn

    def spy(name, m, f, r, s):
        calls.append((name, sorted(f[1].tolist())))
        return real(name, m, f, r, s)

    monkeypatch.setattr(rum, "unlearn", spy)
    scores = np.linspace(1, 0, 20)  # confidence: row 0 least memorized ... row 19 most
    plan = RumPlan("confidence", {"low": "finetune", "medium": None, "high": "neggrad"})
    rum_unlearn(model, forget, retain, scores, plan)
    # tertiles 7/7/6; low first (rows 0-6), medium skipped, high last (rows 14-19)
    assert [c[0] for c in calls] == ["finetune", "neggrad"]
    assert calls[0][1] == sorted(forget[1][:7].tolist())
    assert calls[1][1] == sorted(forget[1][14:].tolist())
    with pytest.raises(ValueError, match="one score per forget sample"):
        rum_unlearn(model, forget, retain, scores[:5], plan)
    with pytest.raises(ValueError, match="algorithms one of"):
        RumPlan("confidence", {"low": "nope"})


def test_rum_config_is_validated_at_load(tmp_path):
    with pytest.raises(ConfigError) as e:
        tiny_config(tmp_path, "rum.low=magic", "rum.route_quantile=2", "rum.score=loss")
    msg = str(e.value)
    assert "rum.low" in msg and "allowed: finetune" in msg
    assert "rum.route_quantile" in msg and "rum.score" in msg
    with pytest.raises(ConfigError, match="at least one group"):
        tiny_config(tmp_path, "rum.low=null", "rum.medium=null", "rum.high=null")


def _forget_one(tmp_path, *overrides, before=None):
    from ray_unlearn.platform.core.audit import audit
    from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
    from ray_unlearn.platform.core.plan import TEST
    from ray_unlearn.platform.core.run import create_run
    from ray_unlearn.platform.core.runtime import train_all_shards

    ctx = create_run(
        tiny_config(
            tmp_path,
            "unlearning.strategy=rum",
            "rum.epochs=1",
            "training.torch_threads=1",
            *overrides,
        )
    )
    train_all_shards(ctx)
    owner = str(ctx.plan.owner_ids[ctx.plan.shards != TEST][0])
    if before is not None:
        before(ctx, owner)
    rec = UnlearningEngine(ctx, LocalShards(ctx)).forget(owner_id=owner)
    (shard,) = rec.details["shards"]
    return rec, rec.details["strategy_info"][str(shard)], audit(ctx, owner_id=owner)


def test_rum_strategy_unlearns_approximately(tmp_path):
    rec, info, a = _forget_one(tmp_path)
    assert info["decision"] == "rum" and info["score"] == "confidence"
    assert 0 <= info["memorization_quantile"] <= 1
    assert rec.details["exact"] is False
    # the deleted ids are in no live version, and the audit says the versions are approximate
    assert a["clean"] and a["live_versions_containing"] == {}
    assert a["exact"] is False and a["approximate_live_versions"]


def test_routing_sends_memorized_requests_to_exact_retraining(tmp_path):
    from ray_unlearn.platform.methods.rum.memorization import save_scores

    def mark_owner_most_memorized(ctx, owner):
        ids = ctx.split_records("train").sample_ids
        mem = np.where(np.isin(ids, ctx.plan.samples_of_owner(owner)), 1.0, 0.0)
        save_scores(ctx, "exact", ids, mem, 0.0)

    rec, info, a = _forget_one(
        tmp_path, "rum.score=exact", "rum.route_quantile=0.9", before=mark_owner_most_memorized
    )
    assert info["decision"] == "exact" and info["memorization_quantile"] > 0.9
    assert rec.details["exact"] is True and a["clean"] and a["exact"]


def test_routing_keeps_unmemorized_requests_approximate(tmp_path):
    from ray_unlearn.platform.methods.rum.memorization import save_scores

    def mark_owner_least_memorized(ctx, owner):
        ids = ctx.split_records("train").sample_ids
        mem = np.where(np.isin(ids, ctx.plan.samples_of_owner(owner)), -1.0, 0.0)
        save_scores(ctx, "exact", ids, mem, 0.0)

    _, info, _ = _forget_one(
        tmp_path, "rum.score=exact", "rum.route_quantile=0.5", before=mark_owner_least_memorized
    )
    assert info["decision"] == "rum" and info["memorization_quantile"] == 0.0


def test_stored_scores_are_required_for_exact_and_holdout(tmp_path):
    with pytest.raises(FileNotFoundError, match="no stored 'holdout_kl' scores"):
        _forget_one(tmp_path, "rum.score=holdout_kl")


def test_random_routing_is_the_control(tmp_path):
    _, info, _ = _forget_one(tmp_path, "rum.route_by=random", "rum.route_quantile=0.0")
    assert info["decision"] == "exact" and info["route_by"] == "random" and 0 <= info["coin"] < 1
