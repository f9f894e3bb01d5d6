"""Shared evaluation: accuracy on retain/forget/test and a membership-inference attack."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ray_unlearn.platform.core.models import build_model
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.eval.accuracy import serving_accuracy
from ray_unlearn.platform.eval.mia import (
    EvalSet,
    MembershipAttack,
    attack_features,
    eval_sets,
    evaluate,
    membership_inference,
    model_predictor,
    retrained_predictor,
    serving_predictor,
)
from tests.conftest import ROOT, tiny_config


def _probs(conf: np.ndarray, labels: np.ndarray, classes: int = 4) -> np.ndarray:
    """Probabilities with true-class confidence ``conf`` (rest spread evenly)."""
    p = np.repeat(((1 - conf) / (classes - 1))[:, None], classes, axis=1)
    p[np.arange(len(labels)), labels] = conf
    return p


@pytest.mark.parametrize("kind", ["threshold", "logistic"])
def test_attack_on_a_toy_case(kind):
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 4, n)
    members = _probs(rng.uniform(0.9, 0.99, n), y)  # confident on what it trained on
    non = _probs(rng.uniform(0.3, 0.6, n), y)
    attack = MembershipAttack(kind).fit(members, y, non, y)
    assert attack.member_rate(members, y) == 1.0 and attack.member_rate(non, y) == 0.0
    # a forget set the model still remembers, one it forgot, and half of each
    assert attack.member_rate(_probs(np.full(10, 0.95), y[:10]), y[:10]) == 1.0
    assert attack.member_rate(_probs(np.full(10, 0.4), y[:10]), y[:10]) == 0.0
    half = _probs(np.r_[np.full(5, 0.95), np.full(5, 0.4)], y[:10])
    assert attack.member_rate(half, y[:10]) == 0.5

    out = membership_inference((members, y), (non, y), (half, y[:10]), kind=kind)
    assert out["mia_attack_accuracy"] == 1.0 and out["mia_forget"] == 0.5
    assert out["mia_retain"] == 1.0 and out["mia_test"] == 0.0


def test_attack_without_signal_is_at_chance():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 4000)
    same = _probs(rng.uniform(0.2, 0.9, 4000), y)
    out = membership_inference((same[:2000], y[:2000]), (same[2000:], y[2000:]), (same, y))
    assert abs(out["mia_attack_accuracy"] - 0.5) < 0.05


def test_evaluate_repeats_the_attack_over_seeded_splits():
    """repeats: the attack's figures are means over seeded splits, with their spread and the
    forget set's sampling error beside them."""
    rng = np.random.default_rng(2)
    n = 300

    def mk(name, lo, hi):
        y = rng.integers(0, 4, n)
        return EvalSet(name, _probs(rng.uniform(lo, hi, n), y), y, np.arange(n))

    retain, forget, test = mk("retain", 0.5, 0.99), mk("forget", 0.4, 0.9), mk("test", 0.2, 0.8)

    def predict(probs):  # the "features" are the probabilities themselves
        return probs.argmax(1), probs

    one = [evaluate(predict, retain, forget, test, seed=s) for s in range(4)]
    avg = evaluate(predict, retain, forget, test, seed=0, repeats=4)
    assert avg["mia_forget"] == pytest.approx(np.mean([o["mia_forget"] for o in one]))
    assert avg["mia_forget_sd"] == pytest.approx(np.std([o["mia_forget"] for o in one]))
    assert one[0]["mia_forget_sd"] == 0.0 and avg["mia_repeats"] == 4
    p = avg["mia_forget"]
    assert avg["mia_forget_se"] == pytest.approx(np.sqrt(p * (1 - p) / n))
    assert avg["accuracy_test"] == one[0]["accuracy_test"]
    with pytest.raises(ValueError, match="repeats"):
        evaluate(predict, retain, forget, test, repeats=0)


def test_attack_features_and_errors():
    y = np.array([0, 1])
    f = attack_features(_probs(np.array([0.7, 0.25]), y), y)
    assert f.shape == (2, 4) and f[0, 0] == pytest.approx(np.log(0.7))
    assert f[0, 3] == pytest.approx(0.7 - 0.1) and f[1, 3] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="allowed"):
        MembershipAttack("svm")
    with pytest.raises(ValueError, match="fit the attack first"):
        MembershipAttack().predict(_probs(np.array([0.5]), y[:1]), y[:1])


@pytest.fixture
def run1(tmp_path):
    """A tiny trained run with one torch thread."""
    torch.set_num_threads(1)
    ctx = create_run(tiny_config(tmp_path, "training.torch_threads=1"))
    train_all_shards(ctx)
    return ctx


def test_a_reopened_run_evaluates_without_non_writable_warnings(run1):
    """A fresh process reads the eval rows from the run's copy of its data (Arrow, zero
    copy); the predictors hand them to torch: no "not writable" warning (torch warns once a
    process, hence a process of its own), and the arrays are writable."""
    code = f"""
import warnings
warnings.filterwarnings("error", message="The given NumPy array is not writable")
from ray_unlearn.platform.core.run import open_run
from ray_unlearn.platform.eval.accuracy import serving_accuracy
from ray_unlearn.platform.eval.mia import eval_sets, evaluate, serving_predictor
ctx = open_run({run1.storage.uri!r}, {run1.run_id!r})
assert "records" not in ctx.__dict__  # not loaded whole: rows come from the copy
sets = eval_sets(ctx, ctx.split_records("train").sample_ids[:10])
assert all(s.features.flags.writeable for s in sets)
evaluate(serving_predictor(ctx), *sets)
serving_accuracy(ctx)
print("clean")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "clean" in res.stdout, res.stderr[-2000:]


def test_evaluate_the_ensemble_and_one_model(run1):
    ctx = run1
    owners = np.unique(ctx.plan.owner_ids[ctx.plan.shards != TEST])[:5]
    forget_ids = np.concatenate([ctx.plan.samples_of_owner(o) for o in owners])
    forget_ids = forget_ids[ctx.plan.locate(forget_ids)[0] != TEST]
    retain, forget, test = eval_sets(ctx, forget_ids)
    assert len(forget) == len(forget_ids) and not np.isin(forget_ids, retain.sample_ids).any()
    assert len(retain) + len(forget) == ctx.info["num_train"] and len(test) == ctx.info["num_test"]

    ens = evaluate(serving_predictor(ctx), retain, forget, test)
    assert ens["accuracy_test"] == pytest.approx(serving_accuracy(ctx))  # same ensemble
    for k in ("accuracy_retain", "accuracy_forget", "mia_forget", "mia_attack_accuracy"):
        assert 0.0 <= ens[k] <= 1.0
    assert ens["accuracy_retain"] > ens["accuracy_test"]  # it did train on them

    ref = evaluate(retrained_predictor(ctx, forget_ids), retain, forget, test)
    assert 0.0 <= ref["mia_forget"] <= 1.0 and ref["accuracy_test"] > 0.5

    model = build_model(ctx.config.model, ctx.feature_shape, ctx.num_classes)
    model.load_state_dict(
        ctx.model_store.load_state(ctx.model_store.registry().shards[0].chain[-1])
    )
    one = evaluate(model_predictor(model), retain, forget, test, attack="logistic")
    assert 0.0 <= one["mia_forget"] <= 1.0 and one["n_forget"] == len(forget)
