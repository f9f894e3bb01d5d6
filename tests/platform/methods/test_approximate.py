"""The approximate unlearning algorithms behind ``approximate.unlearn`` (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_unlearn.platform.methods.approximate import (
    ALGORITHMS,
    NEEDS_RETAIN,
    ApproxSettings,
    saliency_mask,
    unlearn,
)
from ray_unlearn.platform.methods.rum.memorization import fit, probabilities
from tests.platform.methods.rum.test_memorization import SPEC, blobs


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def memorized_model():
    """A model that memorized 20 mislabeled rows (the forget set) among 220 clean ones:
    (model, forget, retain), the sets as (features, labels) tensors."""
    x, y = blobs()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = fit(SPEC, xt, yt, seed=0)
    finally:
        torch.set_num_threads(threads)
    return model, (xt[:20], yt[:20]), (xt[20:], yt[20:])


@pytest.fixture(scope="module")
def trained():
    return memorized_model()


def acc(model, data) -> float:
    return float((probabilities(model, data[0]).argmax(1) == data[1]).float().mean())


def test_the_model_memorized_the_forget_set(trained):
    model, forget, retain = trained
    assert acc(model, forget) > 0.8 and acc(model, retain) > 0.95


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_lowers_forget_accuracy_and_keeps_the_input(trained, name):
    model, forget, retain = trained
    before = [p.detach().clone() for p in model.parameters()]
    out = unlearn(name, model, forget, retain, ApproxSettings(epochs=5, lr=5e-3))
    assert acc(out, forget) < acc(model, forget) - 0.2  # the memorized wrong labels go
    if name != "neggrad":  # plain ascent has no retain term; the others keep the rest
        assert acc(out, retain) > 0.8
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_neggrad_ascends_the_forget_loss(trained):
    model, forget, retain = trained

    def loss(m):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(m(forget[0]), forget[1]))

    out = unlearn("neggrad", model, forget, retain, ApproxSettings(epochs=3, lr=5e-3))
    assert loss(out) > loss(model) + 0.5


def test_results_are_seeded(trained):
    model, forget, retain = trained
    s = ApproxSettings(epochs=1, seed=7)
    a, b = (unlearn("salun", model, forget, retain, s) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_saliency_mask_keeps_the_requested_share_of_the_largest_gradients(trained):
    model, forget, _ = trained
    mask = saliency_mask(model, forget, 0.25)
    kept = sum(m.sum().item() for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    assert 0.24 <= kept / total <= 0.27
    # every kept weight's |gradient| is at least every dropped weight's
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(forget[0]), forget[1]).backward()
    g = {p: p.grad.abs() for p in mask}
    model.zero_grad(set_to_none=True)
    low_kept = min(g[p][m.bool()].min() for p, m in mask.items() if m.any())
    high_dropped = max(g[p][~m.bool()].max() for p, m in mask.items() if (~m.bool()).any())
    assert low_kept >= high_dropped
    with pytest.raises(ValueError, match="mask_fraction"):
        saliency_mask(model, forget, 0.0)


def test_salun_only_moves_the_salient_weights(trained):
    model, forget, retain = trained
    s = ApproxSettings(epochs=2, lr=5e-3, mask_fraction=0.1)
    mask = saliency_mask(model, forget, s.mask_fraction)
    out = unlearn("salun", model, forget, retain, s)
    moved = 0
    for (name, p0), p1 in zip(model.named_parameters(), out.parameters(), strict=True):
        m = mask[p0].bool()
        assert torch.equal(p0[~m], p1[~m]), f"{name}: a weight outside the mask moved"
        moved += int((p0[m] != p1[m]).sum())
    assert moved > 0


def test_bad_input_is_refused(trained):
    model, forget, retain = trained
    with pytest.raises(ValueError, match="unknown approximate algorithm 'magic'; known: finetune"):
        unlearn("magic", model, forget, retain)
    with pytest.raises(ValueError, match="empty"):
        unlearn("neggrad", model, (forget[0][:0], forget[1][:0]), retain)
    empty = (retain[0][:0], retain[1][:0])
    for name in NEEDS_RETAIN:
        with pytest.raises(ValueError, match="retain set, which is empty"):
            unlearn(name, model, forget, empty)
    unlearn("random_label", model, forget, empty, ApproxSettings(epochs=1))  # works without
    with pytest.raises(ValueError, match=r"epochs must be >= 1.*alpha must be in \[0, 1\]"):
        ApproxSettings(epochs=0, alpha=2.0)
