"""U-LiRA shadows for the hybrid methods (platform/methods/hybrid/shadows.py), in process on
a tiny digits run: the retrained side is checked against SISA's exact unlearning of the
same owners (bit for bit, an independent path to the same model), and the shadow forgets
exactly the owners of its masked rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.eval.lira import group_membership, mask_seed
from ray_unlearn.platform.methods.hybrid.shadows import (
    RETRAINED,
    HybridShadow,
    Variant,
    serving_confidence,
    states_confidence,
)
from tests.conftest import tiny_config

REC = ["hybrid.record=true", "training.torch_threads=1"]


@pytest.fixture
def target(tmp_path):
    """A tiny digits run (not trained: only its split and data), the Parquet of its training
    rows, and 6 candidate owners' training rows."""
    torch.set_num_threads(1)
    ctx = create_run(tiny_config(tmp_path, *REC))
    train = ctx.split_records("train")
    path = tmp_path / "train_rows.parquet"
    import pyarrow.parquet as pq

    pq.write_table(train.to_table(), path)
    owners = sorted(set(train.owner_ids.tolist()))[:6]
    ids = np.concatenate([ctx.plan.samples_of_owner(o) for o in owners])
    ids = ids[ctx.plan.locate(ids)[0] != TEST]
    rows = ctx.rows(ids)
    return ctx, str(path), rows


def _shadow(ctx, path, rows, tmp_path, variants):
    return HybridShadow(
        ctx.config,
        path,
        rows.owner_ids,
        np.ascontiguousarray(rows.features),
        rows.labels,
        variants,
        str(tmp_path / "shadows"),
        seed=7,
    )


def test_the_retrained_side_is_sisas_exact_unlearning_and_dpus_differs(target, tmp_path):
    ctx, path, rows = target
    shadow = _shadow(ctx, path, rows, tmp_path, (Variant("sisa", "sisa"), Variant("dpus", "dpus")))
    mask = group_membership(rows.owner_ids, 4, seed=0)[0]
    res = shadow(mask)
    assert set(res.confidences) == {"sisa", "dpus", RETRAINED}
    for c in res.confidences.values():
        assert c.shape == (len(rows),) and np.isfinite(c).all()
    # SISA's unlearning equals retraining from scratch bit for bit: the shadow's "out" side
    # (every shard retrained without the rows) must agree with it exactly
    np.testing.assert_array_equal(res.confidences["sisa"], res.confidences[RETRAINED])
    assert not np.array_equal(res.confidences["dpus"][mask], res.confidences[RETRAINED][mask])
    # it forgot exactly the masked rows' owners, with a seed drawn from the mask
    assert sorted(res.owners) == sorted(set(rows.owner_ids[mask].tolist()))
    assert res.seed == mask_seed(7, mask) % 2**31 and res.seed != ctx.config.seed
    assert {"train", "sisa", "dpus", RETRAINED} == set(res.seconds)
    assert not (tmp_path / "shadows").exists() or not any((tmp_path / "shadows").iterdir())


def test_a_shadow_without_variants_only_retrains_and_is_a_function_of_its_mask(target, tmp_path):
    ctx, path, rows = target
    shadow = _shadow(ctx, path, rows, tmp_path, ())
    masks = group_membership(rows.owner_ids, 4, seed=0)
    a, b = shadow(masks[0]), shadow(masks[0])
    assert set(a.confidences) == {RETRAINED} and "train" not in a.seconds
    np.testing.assert_array_equal(a.confidences[RETRAINED], b.confidences[RETRAINED])
    c = shadow(masks[1])  # another mask: another seed, another model
    assert c.seed != a.seed
    assert not np.array_equal(a.confidences[RETRAINED], c.confidences[RETRAINED])


def test_serving_confidence_is_the_ensembles_mean_probability(target):
    ctx, _, rows = target
    from ray_unlearn.platform.core.runtime import train_all_shards
    from ray_unlearn.platform.eval.mia import serving_predictor

    train_all_shards(ctx)
    x = np.ascontiguousarray(rows.features)
    got = serving_confidence(ctx, x, rows.labels)
    _, probs = serving_predictor(ctx)(x)  # float32 mean of the shards' softmax
    p_y = probs[np.arange(len(rows)), rows.labels].astype(np.float64)
    np.testing.assert_allclose(got, np.log(p_y / (1 - p_y)), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="every shard is empty"):
        states_confidence(ctx, {}, x, rows.labels)


def test_bad_shadow_setups_are_refused(target, tmp_path):
    ctx, path, rows = target
    with pytest.raises(ValueError, match="same candidate rows"):
        HybridShadow(ctx.config, path, rows.owner_ids[:-1], rows.features, rows.labels, (), "w")
    with pytest.raises(ValueError, match="unique"):
        _shadow(ctx, path, rows, tmp_path, (Variant("hs", "hs"), Variant("hs", "hs")))
    shadow = _shadow(ctx, path, rows, tmp_path, ())
    with pytest.raises(ValueError, match="mask must be"):
        shadow(np.ones(3, bool))
