"""Memorization scores: Feldman's estimator, training-time proxies, holdout KL, storage (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ray_unlearn.platform.core.config import ModelConfig
from ray_unlearn.platform.methods.rum.memorization import (
    DIRECTION,
    PROXIES,
    SCORES,
    FitSpec,
    as_memorization,
    compute_run_scores,
    exact_memorization,
    fit,
    holdout_kl,
    load_scores,
    memorization_from_runs,
    proxy_scores,
    save_scores,
    scores_for,
    snapshot_proxies,
    split_half_reliability,
    subset_mask,
    train_with_proxies,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and the machine's cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SPEC = FitSpec(ModelConfig(hidden=[64]), (8,), 3, epochs=40, batch_size=32, lr=1e-2)


def blobs(n=240, seed=0, flip=20):
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
    # sample 1: held by 0, 1 (right), not by 2, 3 (right): 1 - 1
    # sample 2: held by 1, 2, 3 (right), not by 0 (wrong): 1 - 0
    np.testing.assert_array_equal(mem, [1.0, 0.0, 1.0])
    # a sample no model left out has no estimate
    assert np.isnan(memorization_from_runs(np.ones((2, 1), bool), np.ones((2, 1)))[0])


def _simulated_runs(models: int, n: int = 400, low: float = 0.0, high: float = 0.9, seed: int = 0):
    """(M, n) masks and correctness of models that are right on a held row always and on an
    unheld row with probability 1 - mem, mem uniform in [low, high] (equal: no row differs)."""
    rng = np.random.default_rng(seed)
    mem = rng.uniform(low, high, n)
    masks = rng.random((models, n)) < 0.7
    correct = np.where(masks, True, rng.random((models, n)) < 1 - mem)
    return masks, correct


def test_split_half_reliability_grows_with_models_and_is_near_zero_without_signal():
    few = split_half_reliability(*_simulated_runs(8), splits=10)
    many = split_half_reliability(*_simulated_runs(400), splits=10)
    assert many["models"] == 400 and many["splits"] == 10
    assert many["mean"] > 0.85 and few["mean"] < 0.6 < many["mean"]
    assert few["min"] <= few["mean"] <= few["max"]
    assert many["spearman_brown"] == pytest.approx(2 * many["mean"] / (1 + many["mean"]))
    # every row memorized alike: the halves agree only by chance
    flat = split_half_reliability(*_simulated_runs(200, low=0.3, high=0.3), splits=5)
    assert abs(flat["mean"]) < 0.15


def test_split_half_reliability_refuses_bad_input():
    masks, correct = _simulated_runs(3)
    with pytest.raises(ValueError, match="M >= 4"):
        split_half_reliability(masks, correct)
    masks, correct = _simulated_runs(6)
    with pytest.raises(ValueError, match="same shape"):
        split_half_reliability(masks, correct[:, :10])
    with pytest.raises(ValueError, match="splits"):
        split_half_reliability(masks, correct, splits=0)


def test_subset_masks_are_seeded_and_differ_between_models():
    a, b = subset_mask(1000, 0.7, 3, 0), subset_mask(1000, 0.7, 3, 1)
    np.testing.assert_array_equal(a, subset_mask(1000, 0.7, 3, 0))
    assert not np.array_equal(a, b) and 0.65 < a.mean() < 0.75


def test_exact_estimator_finds_the_mislabeled_rows_and_keeps_threads():
    x, y = blobs()
    torch.set_num_threads(2)  # (the fixture restores the usual count)
    mem = exact_memorization(SPEC, x, y, models=6, keep=0.6, seed=0)
    assert torch.get_num_threads() == 2  # its one-thread models restore the caller's count
    flipped, clean = np.nanmean(mem[:20]), np.nanmean(mem[20:])
    assert flipped > 0.3 and clean < 0.1
    with pytest.raises(ValueError, match="models must be >= 2"):
        exact_memorization(SPEC, x, y, models=1)
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\)"):
        exact_memorization(SPEC, x, y, models=2, keep=1.0)


def test_proxy_scores_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    s = proxy_scores(p, torch.tensor([1, 0]))
    np.testing.assert_allclose(s["confidence"], [0.2, 0.5])
    np.testing.assert_allclose(s["max_confidence"], [0.7, 0.5])
    np.testing.assert_allclose(s["binary_accuracy"], [0.0, 1.0])  # argmax ties: first
    h0 = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1))
    np.testing.assert_allclose(s["entropy"], [h0, np.log(2)], rtol=1e-5)


def test_proxies_point_at_the_mislabeled_rows():
    x, y = blobs()
    _, proxies = train_with_proxies(SPEC, x, y, seed=0)
    assert set(proxies) == set(PROXIES)
    for name, s in proxies.items():
        mem = as_memorization(name, s)  # oriented: higher = more memorized
        assert mem[:20].mean() > mem[20:].mean() + 0.05, name
    with pytest.raises(ValueError, match="unknown score 'nope'"):
        as_memorization("nope", proxies["entropy"])


class _Fixed(nn.Module):
    """Outputs the same logits for every input row."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_snapshot_proxies_average_over_the_checkpoints_that_trained_on_each_row():
    # two checkpoints: stage 0 trained on slice 0, stage 1 on slices 0 and 1
    m0, m1 = _Fixed([0.0, 0.0]), _Fixed([np.log(3.0), 0.0])  # p(class 0) = 0.5, then 0.75
    x, y = torch.zeros(3, 2), torch.tensor([0, 0, 1])
    got = snapshot_proxies([m0, m1], x, y, np.array([0, 1, 0]))
    # row 0 (slice 0): mean of 0.5 and 0.75; row 1 (slice 1): only stage 1; row 2: label 1
    np.testing.assert_allclose(got["confidence"], [0.625, 0.75, 0.375], rtol=1e-6)
    np.testing.assert_allclose(got["binary_accuracy"], [1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="a checkpoint per stage"):
        snapshot_proxies([m0], x, y, np.array([0, 1, 0]))


def test_holdout_kl_is_larger_on_memorized_rows_and_leaves_the_model_alone():
    x, y = blobs()
    hx, hy = blobs(n=120, seed=1, flip=0)
    model = fit(SPEC, torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)), seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    kl = holdout_kl(SPEC, model, x, hx, hy, epochs=3)
    assert (kl >= 0).all() and kl[:20].mean() > kl[20:].mean()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="held-out rows"):
        holdout_kl(SPEC, model, x, hx[:0], hy[:0])


def test_scores_are_stored_with_the_run(tmp_path):
    from ray_unlearn.platform.core.run import create_run
    from tests.conftest import tiny_config

    ctx = create_run(tiny_config(tmp_path))
    with pytest.raises(FileNotFoundError, match="compute_run_scores"):
        load_scores(ctx, "exact")
    with pytest.raises(ValueError, match="one score per sample id"):
        save_scores(ctx, "entropy", np.arange(3), np.zeros(2), 0.0)
    # every score, tiny: the run's 2-epoch model, 3 subset models for the estimator
    cost = compute_run_scores(ctx, SCORES, models=3, holdout_epochs=1)
    assert set(cost) == set(SCORES) and all(c > 0 for c in cost.values())
    train_ids = ctx.split_records("train").sample_ids
    for name in SCORES:
        ids, vals = load_scores(ctx, name)
        np.testing.assert_array_equal(ids, train_ids)
        assert vals.shape == ids.shape and not np.isnan(vals).all()
        meta = ctx.storage.read_table(f"{ctx.layout.reports}/memorization/{name}.parquet")
        assert meta.schema.metadata[b"direction"] == str(DIRECTION[name]).encode()
    test_id = ctx.split_records("test").sample_ids[0]
    got = scores_for(ctx, "confidence", np.array([train_ids[5], test_id]))
    assert got[0] == load_scores(ctx, "confidence")[1][5] and np.isnan(got[1])
    with pytest.raises(ValueError, match="unknown"):
        compute_run_scores(ctx, ["confidence", "loss"])
