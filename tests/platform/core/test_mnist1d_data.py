"""MNIST-1D as a bundled source: generated offline (never downloaded), stored as Parquet,
deterministic in its seeds, read back without regenerating."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pydantic import ValidationError

from ray_unlearn.platform.core.data import DataConfig, bundled_name, load_dataset
from ray_unlearn.platform.core.data import bundled as bundled_mod
from ray_unlearn.platform.core.data.config import Mnist1dConfig
from ray_unlearn.platform.core.data.mnist1d import generate_mnist1d
from ray_unlearn.platform.core.storage import Storage, dataset_path

mnist1d_data = pytest.importorskip("mnist1d.data")


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("mnist1d.get_dataset downloads: the loader must not call it")

    monkeypatch.setattr(mnist1d_data, "get_dataset", boom)


def _cfg(n: int = 100, gen_seed: int = 0, **kw) -> DataConfig:
    return DataConfig(source="mnist1d", mnist1d=Mnist1dConfig(n_samples=n, seed=gen_seed), **kw)


def test_loads_shapes_labels_and_stores_parquet(tmp_path):
    storage = Storage(tmp_path)
    cfg = _cfg(120, samples_per_owner=3)
    rec = load_dataset(cfg, storage)
    assert len(rec) == 120
    assert rec.features.shape == (120, 40) and rec.features.dtype == np.float32
    assert rec.feature_shape == (40,) and rec.num_classes == 10
    np.testing.assert_array_equal(np.bincount(rec.labels, minlength=10), np.full(10, 12))
    assert np.isfinite(rec.features).all() and rec.features.std() > 0.5  # standardised signals
    np.testing.assert_array_equal(rec.sample_ids, np.arange(120))
    _, sizes = np.unique(rec.owner_ids, return_counts=True)
    assert 2.0 <= sizes.mean() <= 4.0 and sizes.min() >= 1
    assert bundled_name(cfg) == "mnist1d-n120-g0-spo3-s0"
    assert storage.exists(dataset_path(bundled_name(cfg)))


def test_second_load_reads_the_parquet(tmp_path, monkeypatch):
    storage = Storage(tmp_path)
    first = load_dataset(_cfg(), storage)

    def boom(*_a, **_k):
        raise AssertionError("regenerated instead of reading the stored parquet")

    monkeypatch.setattr(bundled_mod, "generate_mnist1d", boom)
    again = load_dataset(_cfg(), storage)
    np.testing.assert_array_equal(first.features, again.features)
    np.testing.assert_array_equal(first.owner_ids, again.owner_ids)


def test_generator_seed_changes_signals_and_data_seed_only_owners(tmp_path):
    storage = Storage(tmp_path)
    a = load_dataset(_cfg(gen_seed=1), storage)
    b = load_dataset(_cfg(gen_seed=2), storage)
    c = load_dataset(_cfg(gen_seed=1, seed=5), storage)
    assert not np.array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.features, c.features)
    np.testing.assert_array_equal(a.labels, c.labels)
    assert not np.array_equal(a.owner_ids, c.owner_ids)
    x1, y1 = generate_mnist1d(100, 1)
    np.testing.assert_array_equal(x1, a.features)  # deterministic, in the package's order
    np.testing.assert_array_equal(y1, a.labels)


def test_global_random_state_is_left_alone():
    np.random.seed(123)
    random.seed(123)
    expect_np, expect_py = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    generate_mnist1d(50, 7)  # the package reseeds both global generators
    assert np.random.random() == expect_np and random.random() == expect_py


def test_bad_sizes_are_refused():
    with pytest.raises(ValidationError, match="multiple of 10"):
        Mnist1dConfig(n_samples=105)
    with pytest.raises(ValueError, match="multiple of 10"):
        generate_mnist1d(15, 0)


def test_other_sources_dump_without_the_mnist1d_section():
    assert "mnist1d" not in DataConfig().model_dump()
    dumped = _cfg(200, 3).model_dump()
    assert dumped["mnist1d"] == {"n_samples": 200, "seed": 3}
    assert DataConfig(**dumped) == _cfg(200, 3)
