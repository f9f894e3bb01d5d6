"""Memorization scores, approximate algorithms and RUM on small synthetic data (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_unlearn.platform.approximate import ALGORITHMS, ApproxSettings, saliency_mask, unlearn
from ray_unlearn.platform.config import ModelConfig
from ray_unlearn.platform.memorization import (
    FitSpec,
    as_memorization,
    exact_memorization,
    fit,
    holdout_kl,
    memorization_from_runs,
    probabilities,
    train_with_proxies,
)
from ray_unlearn.platform.rum import RumPlan, quality, rum_unlearn, split_groups

SPEC = FitSpec(ModelConfig(hidden=[64]), (8,), 3, epochs=60, batch_size=32, lr=1e-2)


def _data(n=240, seed=0, flip=20):
    """Three separable blobs; the first ``flip`` rows get a wrong label (only memorizable)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.normal(size=(n, 8)) * 0.6 + np.eye(3, 8)[y] * 3).astype(np.float32)
    y[:flip] = (y[:flip] + 1) % 3
    return x, y


def test_memorization_from_runs_by_hand():
    masks = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1], [0, 0, 1]], bool)
    correct = np.array([[1, 1, 0], [0, 1, 1], [1, 1, 1], [0, 1, 1]], float)
    mem = memorization_from_runs(masks, correct)
    # sample 0: held by models 0, 2 (both right), not by 1, 3 (both wrong): 1 - 0
    # sample 1: held by 0, 1 (right), not by 2, 3 (right): 0; sample 2: never left out -> 0/1
    assert mem[0] == 1.0 and mem[1] == 0.0
    assert mem[2] == pytest.approx(1.0 - 0.0)
    assert np.isnan(memorization_from_runs(np.ones((2, 1), bool), np.ones((2, 1)))[0])


def test_exact_estimator_finds_the_mislabeled_rows():
    x, y = _data()
    mem = exact_memorization(SPEC, x, y, models=8, keep=0.6, seed=0)
    flipped, clean = np.nanmean(mem[:20]), np.nanmean(mem[20:])
    assert flipped > 0.3 and clean < 0.1 and flipped > clean + 0.3
    with pytest.raises(ValueError, match="models must be >= 2"):
        exact_memorization(SPEC, x, y, models=1)


def test_proxies_point_at_the_mislabeled_rows():
    x, y = _data()
    _, proxies = train_with_proxies(SPEC, x, y, seed=0)
    assert set(proxies) == {"confidence", "max_confidence", "entropy", "binary_accuracy"}
    for name, s in proxies.items():
        mem = as_memorization(name, s)  # oriented: higher = more memorized
        assert mem[:20].mean() > mem[20:].mean(), name
    with pytest.raises(ValueError, match="unknown score"):
        as_memorization("nope", proxies["entropy"])


def test_holdout_kl_is_larger_on_memorized_rows_and_leaves_the_model_alone():
    x, y = _data()
    hx, hy = _data(n=120, seed=1, flip=0)
    model = fit(SPEC, torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    kl = holdout_kl(SPEC, model, x, hx, hy, epochs=3)
    assert kl[:20].mean() > kl[20:].mean()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.fixture(scope="module")
def trained():
    x, y = _data()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    model = fit(SPEC, xt, yt, seed=0)
    forget, retain = (xt[:20], yt[:20]), (xt[20:], yt[20:])
    return model, forget, retain


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_lowers_forget_accuracy_and_keeps_the_input(trained, name):
    model, forget, retain = trained
    before = [p.detach().clone() for p in model.parameters()]

    def acc(m, d):
        return float((probabilities(m, d[0]).argmax(1) == d[1]).float().mean())

    out = unlearn(name, model, forget, retain, ApproxSettings(epochs=5, lr=5e-3))
    assert acc(out, forget) < acc(model, forget)  # the memorized wrong labels are dropped
    assert acc(out, retain) > 0.8
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_unknown_algorithm_and_empty_forget_set(trained):
    model, forget, retain = trained
    with pytest.raises(ValueError, match="unknown approximate algorithm"):
        unlearn("magic", model, forget, retain)
    with pytest.raises(ValueError, match="empty"):
        unlearn("neggrad", model, (forget[0][:0], forget[1][:0]), retain)


def test_saliency_mask_keeps_the_requested_share(trained):
    model, forget, _ = trained
    mask = saliency_mask(model, forget, 0.25)
    kept = sum(m.sum().item() for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    assert 0.24 <= kept / total <= 0.27
    with pytest.raises(ValueError, match="mask_fraction"):
        saliency_mask(model, forget, 0.0)


def test_groups_follow_each_scores_direction():
    conf = np.array([0.9, 0.1, 0.5, 0.95, 0.2, 0.6])  # high confidence = low memorization
    g = split_groups("confidence", conf)
    assert set(g["low"]) == {0, 3} and set(g["high"]) == {1, 4}
    g = split_groups("entropy", conf)  # high entropy = high memorization
    assert set(g["high"]) == {0, 3}


def test_rum_runs_each_group_with_its_algorithm_and_is_measured(trained):
    model, forget, retain = trained
    calls = []
    import ray_unlearn.platform.rum as rum

    real = rum.unlearn

    def spy(name, m, f, r, s):
        calls.append((name, len(f[1])))
        return real(name, m, f, r, s)

    rum.unlearn = spy
    try:
        plan = RumPlan("confidence", {"low": "finetune", "medium": None, "high": "neggrad"})
        out = rum_unlearn(model, forget, retain, np.linspace(0, 1, 20), plan)
    finally:
        rum.unlearn = real
    assert calls == [("finetune", 7), ("neggrad", 6)]  # tertiles 7/7/6, medium skipped
    q = quality(out, model, forget, retain, retain)
    assert 0 <= q["tow"] <= 1 and 0 <= q["tow_mia"] <= 1
    assert quality(model, model, forget, retain, retain)["tow"] == 1.0
    with pytest.raises(ValueError, match="algorithms one of"):
        RumPlan("confidence", {"low": "nope"})


@pytest.mark.parametrize("route", [None, 0.0])
def test_rum_strategy_through_the_engine(tmp_path, route):
    from ray_unlearn.platform.audit import audit
    from ray_unlearn.platform.plan import TEST
    from ray_unlearn.platform.run import create_run
    from ray_unlearn.platform.shard import train_all_shards
    from ray_unlearn.platform.unlearning import LocalShards, UnlearningEngine
    from tests.conftest import tiny_config

    ctx = create_run(
        tiny_config(
            tmp_path,
            "unlearning.strategy=rum",
            "rum.epochs=1",
            f"rum.route_quantile={route}".replace("None", "null"),
        )
    )
    train_all_shards(ctx)
    owner = str(ctx.plan.owner_ids[ctx.plan.shards != TEST][0])
    rec = UnlearningEngine(ctx, LocalShards(ctx)).forget(owner_id=owner)
    (shard,) = rec.details["shards"]
    info = rec.details["strategy_info"][str(shard)]
    a = audit(ctx, owner_id=owner)
    assert a["clean"] and a["live_versions_containing"] == {}
    if route is None:  # approximate: the audit says so
        assert info["decision"] == "rum" and rec.details["exact"] is False
        assert a["exact"] is False and a["approximate_live_versions"]
    else:  # every request ranks >= quantile 0: routed to exact retraining
        assert info["decision"] == "exact" and rec.details["exact"] is True and a["exact"]
