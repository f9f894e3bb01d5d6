"""LiRA / U-LiRA (platform/eval/lira.py): confidences, the shadow plan, the per-row Gaussians
against analytic values, the metrics against hand-computed ones, and a small MLP that
memorises random labels (a model trained with a row must be told from one without it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.stats import norm

from ray_unlearn.platform.core.config import ModelConfig, TrainingConfig
from ray_unlearn.platform.eval.lira import (
    MLPShadowTrainer,
    ShadowGaussians,
    attack_metrics,
    confidence_from_logits,
    confidence_from_probs,
    ensemble_confidence,
    fit_lira,
    fit_offline,
    fit_ulira,
    forget_metrics,
    group_membership,
    mask_seed,
    membership_matrix,
    offline_scores,
    online_scores,
    shadow_confidence,
    shadow_confidences,
)
from tests.conftest import random_label_shadows

# -- confidence ---------------------------------------------------------------------------------


def test_confidence_is_the_logit_of_the_true_class_probability():
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.5, 0.3], [0.25, 0.25, 0.5]])
    got = confidence_from_probs(probs, np.array([0, 1, 0]))
    np.testing.assert_allclose(got, np.log([0.9 / 0.1, 0.5 / 0.5, 0.25 / 0.75]))


def test_confidence_is_finite_at_p_0_and_1():
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    got = confidence_from_probs(probs, np.array([0, 0]))
    assert np.isfinite(got).all()
    assert got[0] > 700 and got[1] < -700  # +-log(smallest float64) = +-708


def test_confidence_tolerates_rounding_overshoot_only():
    got = confidence_from_probs(np.array([[1 + 1e-7, 0.0]], np.float32), np.array([0]))
    assert got[0] > 700
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        confidence_from_probs(np.array([[1.01, 0.0]]), np.array([0]))


def test_confidence_keeps_precision_where_p_y_rounds_to_1():
    # logits 40 apart: p_y = 1 - 4e-18 rounds to 1.0 in float64, but the other class's
    # 4e-18 is representable, so the confidence is still 40 (1 - p_y would give +708)
    logits = np.array([[40.0, 0.0], [3.0, -1.0], [0.0, 25.0]])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = np.array([0, 0, 0])
    assert probs[0, 0] == 1.0
    np.testing.assert_allclose(confidence_from_probs(probs, labels), [40.0, 4.0, -25.0], rtol=1e-9)
    np.testing.assert_allclose(confidence_from_logits(logits, labels), [40.0, 4.0, -25.0])
    # logits far beyond float64's exp range stay exact
    assert confidence_from_logits(np.array([[1e4, -1e4, 0.0]]), np.array([1]))[0] == -2e4


@pytest.mark.parametrize(
    "probs,labels,match",
    [
        (np.array([[0.5, np.nan]]), np.array([0]), "finite"),
        (np.array([[0.5, 0.5]]), np.array([2]), r"labels must be integers in \[0, 2\)"),
        (np.array([[1.5, -0.5]]), np.array([0]), r"\[0, 1\]"),
        (np.array([0.5, 0.5]), np.array([0]), r"\(n, classes\)"),
        (np.array([[0.5, 0.5]]), np.array([0, 1]), r"labels must be \(1,\)"),
    ],
)
def test_confidence_rejects_bad_input(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        confidence_from_probs(probs, labels)


# -- the shadow plan ----------------------------------------------------------------------------


def test_membership_matrix_is_balanced_per_row_and_seeded():
    m = membership_matrix(1000, 8, seed=3)
    assert m.shape == (8, 1000) and m.dtype == bool
    assert (m.sum(0) == 4).all()  # every row in exactly half of the shadows
    assert (np.abs(m.sum(1) - 500) < 60).all()  # each shadow about half of the rows (~4 sd)
    np.testing.assert_array_equal(m, membership_matrix(1000, 8, seed=3))
    assert not np.array_equal(m, membership_matrix(1000, 8, seed=4))


def test_membership_matrix_with_an_odd_count_gives_every_row_both_sides():
    counts = membership_matrix(1000, 5, seed=0).sum(0)
    assert set(np.unique(counts)) == {2, 3}
    assert 400 < (counts == 3).sum() < 600


@pytest.mark.parametrize("n,shadows,match", [(0, 4, "n .* >= 1"), (10, 1, "shadows must be >= 2")])
def test_membership_matrix_rejects_bad_sizes(n, shadows, match):
    with pytest.raises(ValueError, match=match):
        membership_matrix(n, shadows)


def test_group_membership_gives_a_groups_rows_one_membership():
    rng = np.random.default_rng(0)
    groups = np.array([f"owner-{g:03d}" for g in rng.integers(0, 200, 1000)])
    m = group_membership(groups, 8, seed=1)
    assert m.shape == (8, 1000) and m.dtype == bool
    for g in np.unique(groups)[:50]:
        rows = m[:, groups == g]
        assert (rows == rows[:, :1]).all()  # every row of an owner: in or out together
    # balanced per group: each owner is forgotten by exactly half of the shadows
    _, first = np.unique(groups, return_index=True)
    assert (m[:, first].sum(0) == 4).all()
    np.testing.assert_array_equal(m, group_membership(groups, 8, seed=1))
    assert not np.array_equal(m, group_membership(groups, 8, seed=2))
    with pytest.raises(ValueError, match="non-empty"):
        group_membership(np.array([]), 4)


def test_ensemble_confidence_is_the_mean_probability_confidence():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (3, 20, 5))  # 3 members, 20 rows, 5 classes
    y = rng.integers(0, 5, 20)
    p = np.exp(z - z.max(2, keepdims=True))
    p /= p.sum(2, keepdims=True)
    # independent reference: average the probabilities, then log(p_y / (1 - p_y))
    mean = p.mean(0)
    p_y = mean[np.arange(20), y]
    np.testing.assert_allclose(ensemble_confidence(z, y), np.log(p_y / (1 - p_y)), rtol=1e-9)
    # one member: the member's own confidence
    np.testing.assert_allclose(ensemble_confidence(z[0], y), confidence_from_logits(z[0], y))


def test_ensemble_confidence_keeps_precision_where_the_mean_rounds_to_1():
    # two members, each 50 logits apart in favour of class 0: every p_y rounds to 1, yet the
    # ensemble's confidence is log(mean of the others' e^-50 and e^-60) = 50 - log 2 + ...
    z = np.array([[[50.0, 0.0]], [[60.0, 0.0]]])
    want = -np.log((np.exp(-50.0) + np.exp(-60.0)) / 2)  # others' mean; p_y ~ 1
    np.testing.assert_allclose(ensemble_confidence(z, np.array([0])), [want], rtol=1e-9)
    with pytest.raises(ValueError, match="finite"):
        ensemble_confidence(np.array([[[np.inf, 0.0]]]), np.array([0]))
    with pytest.raises(ValueError, match="members, n, classes"):
        ensemble_confidence(np.zeros((2, 3, 4, 5)), np.zeros(3, int))


# -- per-row Gaussians on synthetic confidences with known distributions ------------------------


def _synthetic(n, shadows, shift, sd_in, sd_out, seed):
    """Row i's confidence is N(mu_i + shift, sd_in) in a model that trained on it and
    N(mu_i, sd_out) in one that did not; mu_i varies widely, as easy and hard rows do."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(-5, 5, n)
    masks = membership_matrix(n, shadows, seed)
    conf = np.where(
        masks,
        rng.normal(mu + shift, sd_in, (shadows, n)),
        rng.normal(mu, sd_out, (shadows, n)),
    )
    return rng, mu, masks, conf


def test_likelihood_ratio_matches_the_analytic_one():
    rng, mu, masks, conf = _synthetic(50, 2000, shift=1.0, sd_in=0.5, sd_out=1.0, seed=0)
    g = fit_lira(conf, masks)
    assert (g.count_in == 1000).all() and (g.count_out == 1000).all()
    np.testing.assert_allclose(g.mean_in, mu + 1.0, atol=0.1)
    np.testing.assert_allclose(g.std_out, 1.0, rtol=0.1)
    c = mu + rng.uniform(-1.5, 2.5, 50)  # target confidences around both distributions
    analytic = norm.logpdf(c, mu + 1.0, 0.5) - norm.logpdf(c, mu, 1.0)
    got = online_scores(c, g)
    # 1000 shadows a side: means within ~0.03-0.06, widths within ~4% (2 standard errors);
    # the LLR moves by up to ~6 per unit of mean or width error near the tails
    np.testing.assert_allclose(got, analytic, rtol=0.1, atol=0.3)
    assert np.median(np.abs(got - analytic)) < 0.1
    # offline: the one-sided test against the "out" Gaussian
    np.testing.assert_allclose(offline_scores(c, g), norm.logcdf(c, mu, 1.0), atol=0.15)


def _targets(rng, mu, shift, sd):
    is_member = rng.random(len(mu)) < 0.5
    return np.where(is_member, rng.normal(mu + shift, sd), rng.normal(mu, sd)), is_member


def test_per_row_calibration_reaches_the_analytic_auc():
    # equal widths: the best test's AUC is Phi(shift / (sd * sqrt 2)) = 0.856 for shift 1.5
    rng, mu, masks, conf = _synthetic(4000, 64, shift=1.5, sd_in=1.0, sd_out=1.0, seed=1)
    c, is_member = _targets(rng, mu, 1.5, 1.0)
    best = norm.cdf(1.5 / np.sqrt(2))
    g = fit_lira(conf, masks)
    for scores in (online_scores(c, g), offline_scores(c, g)):
        assert abs(attack_metrics(scores, is_member).auc - best) < 0.025
    # one global threshold on the raw confidence cannot separate rows of such varied difficulty
    assert attack_metrics(c, is_member).auc < best - 0.15


def test_global_variance_helps_with_few_shadows():
    rng, mu, masks, conf = _synthetic(4000, 4, shift=1.5, sd_in=1.0, sd_out=1.0, seed=2)
    c, is_member = _targets(rng, mu, 1.5, 1.0)
    per_row = attack_metrics(online_scores(c, fit_lira(conf, masks)), is_member).auc
    pooled = attack_metrics(
        online_scores(c, fit_lira(conf, masks, global_variance=True)), is_member
    ).auc
    # 2 shadows a side: each row's variance has one degree of freedom, the pooled one ~4000
    assert pooled > per_row + 0.02 and pooled > 0.75


def test_offline_needs_only_shadows_without_the_rows():
    rng, mu, masks, conf = _synthetic(4000, 64, shift=1.5, sd_in=1.0, sd_out=1.0, seed=3)
    c, is_member = _targets(rng, mu, 1.5, 1.0)
    # the same out-samples as fit_lira's, through shadows known only as "not trained on it"
    g = fit_offline(np.where(masks, np.nan, conf), ~masks)
    assert np.isnan(g.mean_in).all() and (g.count_in == 0).all()
    np.testing.assert_allclose(g.mean_out, fit_lira(conf, masks).mean_out)
    assert abs(attack_metrics(offline_scores(c, g), is_member).auc - norm.cdf(1.5 / 2**0.5)) < 0.025
    with pytest.raises(ValueError, match="use offline_scores"):
        online_scores(c, g)


def test_too_few_shadows_for_a_per_row_variance_is_an_error():
    rng, mu, masks, conf = _synthetic(10, 2, shift=1.0, sd_in=1.0, sd_out=1.0, seed=0)
    with pytest.raises(ValueError, match="global_variance=True or at least 4 shadows"):
        fit_lira(conf, masks)
    with pytest.raises(ValueError, match="no spread to pool"):
        fit_lira(conf, masks, global_variance=True)
    with pytest.raises(ValueError, match="no 'out' shadow"):
        fit_lira(conf, np.ones_like(masks))


@pytest.mark.parametrize("trace", [0.0, 1.5])
def test_ulira_sees_exactly_the_trace_unlearning_left(trace):
    """Unlearned shadows keep ``trace`` of the row (their confidence is N(mu + trace, 1)),
    retrained ones have none (N(mu, 1)). Perfect unlearning (trace 0) must read as chance:
    AUC 0.5 and TPR at 1% FPR about 1%; a trace of 1.5 as the analytic AUC 0.856."""
    rng = np.random.default_rng(7)
    n, shadows = 3000, 64
    mu = rng.uniform(-5, 5, n)
    masks = membership_matrix(n, shadows, seed=7)
    unlearned = rng.normal(mu + trace, 1.0, (shadows, n))
    retrained = rng.normal(mu, 1.0, (shadows, n))
    g = fit_ulira(unlearned, retrained, masks)
    assert (g.count_in == 32).all() and (g.count_out == 32).all()
    target_unlearned, target_retrained = rng.normal(mu + trace, 1.0), rng.normal(mu, 1.0)
    m = forget_metrics(g, target_unlearned, target_retrained)
    assert (m.positives, m.negatives) == (n, n)
    assert abs(m.auc - norm.cdf(trace / np.sqrt(2))) < 0.03
    if trace == 0.0:
        assert m.tpr_at_1pct_fpr < 0.03
    else:
        assert m.tpr_at_1pct_fpr > 0.05


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_against_hand_computed_values():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    member = np.array([True, True, False, True, False, False])
    m = attack_metrics(scores, member)
    # pairs (member, non-member) ranked right: 0.9 and 0.8 beat all 3, 0.6 beats 2 -> 8 of 9
    assert m.auc == pytest.approx(8 / 9)
    # 3 negatives: any false positive is an FPR of 1/3, so both figures are TPR at 0 FP: 2/3
    assert m.tpr_at_1pct_fpr == pytest.approx(2 / 3)
    assert m.tpr_at_01pct_fpr == pytest.approx(2 / 3)
    assert (m.positives, m.negatives, m.min_fpr) == (3, 3, pytest.approx(1 / 3))


def test_tpr_at_low_fpr_counts_the_false_positives_allowed():
    negatives = np.arange(200.0)  # 1% FPR = 2 false positives; 0.1% = 0.2, i.e. none
    positives = np.concatenate([np.full(5, 500.0), np.full(5, 197.5), np.full(10, -1.0)])
    scores = np.concatenate([positives, negatives])
    member = np.arange(len(scores)) < len(positives)
    m = attack_metrics(scores, member)
    assert m.tpr_at_1pct_fpr == pytest.approx(10 / 20)  # above all but 2 negatives
    assert m.tpr_at_01pct_fpr == pytest.approx(5 / 20)  # above every negative
    assert m.min_fpr == pytest.approx(1 / 200)
    assert m.as_dict()["negatives"] == 200


@pytest.mark.parametrize(
    "scores,member,match",
    [
        (np.array([1.0, 2.0]), np.array([True, True]), "need members and non-members"),
        (np.array([1.0, np.nan]), np.array([True, False]), "NaN"),
        (np.array([1.0, 2.0]), np.array([1, 0]), "bool array"),
        (np.array([1.0, 2.0, 3.0]), np.array([True, False]), "bool array"),
    ],
)
def test_metrics_reject_bad_input(scores, member, match):
    with pytest.raises(ValueError, match=match):
        attack_metrics(scores, member)


# -- a real model that memorises: random labels on a small MLP ----------------------------------


def _random_label_trainer(n=128, seed=0):
    """128 rows of 32 random features, 10 random labels, an MLP that memorises them."""
    model, training = ModelConfig(hidden=[64]), TrainingConfig(epochs=60, batch_size=32, lr=3e-3)
    return random_label_shadows(n, 32, 10, model, training, seed=seed)


def test_lira_tells_a_model_trained_with_a_row_from_one_without_it():
    trainer, x, y = _random_label_trainer()
    masks = membership_matrix(len(y), 8, seed=0)
    g = fit_lira(shadow_confidences(trainer, masks, x, y, "logits"), masks)
    # two targets on complementary halves: every row is in exactly one of them
    half = membership_matrix(len(y), 2, seed=99)[0]
    with_a = shadow_confidence(trainer, half, x, y, "logits")
    with_b = shadow_confidence(trainer, ~half, x, y, "logits")
    for score in (online_scores, offline_scores):
        s_a, s_b = score(with_a, g), score(with_b, g)
        s_with, s_without = np.where(half, s_a, s_b), np.where(half, s_b, s_a)
        assert (s_with > s_without).mean() > 0.9  # row by row: the trained-on model wins
        m = attack_metrics(np.concatenate([s_a, s_b]), np.concatenate([half, ~half]))
        assert m.auc > 0.95 and m.tpr_at_1pct_fpr > 0.5


def test_mlp_shadow_trainer_is_a_function_of_its_mask():
    trainer, x, _ = _random_label_trainer(n=64)
    mask = membership_matrix(64, 2, seed=1)[0]
    a, b = trainer(mask)(x), trainer(mask)(x)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (64, 10) and a.dtype == np.float64
    assert not np.array_equal(a, trainer(~mask)(x))
    with pytest.raises(ValueError, match=r"member_mask must be \(64,\)"):
        trainer(mask[:10])


def test_mlp_shadow_trainer_trains_on_the_base_rows_too_and_rejects_bad_setups():
    trainer, x, y = _random_label_trainer(n=64)
    with pytest.raises(ValueError, match="same candidate rows.*threads must be >= 1"):
        MLPShadowTrainer(x, y[:10], trainer.model, trainer.training, (32,), 10, threads=0)
    with pytest.raises(ValueError, match="given together"):
        MLPShadowTrainer(x, y, trainer.model, trainer.training, (32,), 10, base_features=x)
    # every candidate row as a base row: a shadow with no candidate rows still learns them
    with_base = MLPShadowTrainer(
        x, y, trainer.model, trainer.training, (32,), 10, base_features=x, base_labels=y
    )
    none = np.zeros(64, bool)
    acc = (with_base(none)(x).argmax(1) == y).mean()
    assert acc > 0.9 and (trainer(none)(x).argmax(1) == y).mean() < 0.3


def test_ulira_on_a_real_model_catches_no_unlearning_and_passes_exact_retraining():
    """Shadow s forgets the rows of masks[s]. "No unlearning" keeps a model trained on every
    row: U-LiRA must tell its forget rows from a retrained model's. Exact unlearning is a
    retrain without the rows (here with another seed, so the two sides are independent
    draws of the same distribution): it must read as chance."""
    trainer, x, y = _random_label_trainer(n=64)
    # half the epochs of the LiRA test: 15 models here, and the trace stays plain
    trainer = dataclasses.replace(
        trainer, training=trainer.training.model_copy(update={"epochs": 30})
    )
    n = len(y)
    everything = np.ones(n, bool)
    other_seed = dataclasses.replace(trainer, seed=1)

    def kept(forget):  # a model trained on all rows, seeded by the forget set
        return dataclasses.replace(trainer, seed=mask_seed(2, forget))(everything)

    def exact(forget):
        return other_seed(~forget)

    def retrained(forget):
        return trainer(~forget)

    masks = membership_matrix(n, 4, seed=5)
    out_conf = shadow_confidences(retrained, masks, x, y, "logits")
    forget = membership_matrix(n, 2, seed=6)[0]  # the targets' forget set
    target_retrained = shadow_confidence(retrained, forget, x, y, "logits")[forget]
    results = {}
    for name, method in (("none", kept), ("exact", exact)):
        unlearned = shadow_confidences(method, masks, x, y, "logits")
        g = fit_ulira(unlearned, out_conf, masks, global_variance=True)  # 2 shadows a side
        target = shadow_confidence(method, forget, x, y, "logits")[forget]
        sub = ShadowGaussians(*(f[forget] for f in dataclasses.astuple(g)))
        results[name] = forget_metrics(sub, target, target_retrained, online=True)
    assert results["none"].auc > 0.9
    # ~30 forget rows a side: the AUC's standard error is ~0.08, so chance is 0.5 +- 0.2
    assert abs(results["exact"].auc - 0.5) < 0.2
    assert results["exact"].positives == results["exact"].negatives == forget.sum()
