"""Datasets: bundled sources, Parquet reading and validation, the id-hashed split."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from ray_unlearn.platform.core.data import (
    DataConfig,
    DataError,
    Records,
    SyntheticConfig,
    bundled_name,
    load_dataset,
    make_synthetic,
    read_records,
    split_train_test,
    write_records,
)
from ray_unlearn.platform.core.data import bundled as bundled_mod
from ray_unlearn.platform.core.data import parquet as parquet_mod
from ray_unlearn.platform.core.storage import Storage, dataset_path
from tests.conftest import CONFIGS


def _table(n: int = 20, d: int = 4, **columns) -> pa.Table:
    """A valid table of ``n`` rows; keyword arguments replace (or, as None, drop) columns."""
    rng = np.random.default_rng(0)
    cols = {
        "sample_id": pa.array(np.arange(100, 100 + n), pa.int64()),
        "owner_id": pa.array([f"o{i // 3}" for i in range(n)]),
        "label": pa.array(np.arange(n) % 3, pa.int64()),
        "features": pa.array(
            rng.random((n, d)).astype(np.float32).tolist(), pa.list_(pa.float32())
        ),
    }
    cols.update(columns)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def _write(tmp_path, table: pa.Table, name: str = "d.parquet") -> str:
    path = str(tmp_path / name)
    pq.write_table(table, path)
    return path


def _problems(tmp_path, table: pa.Table, **cfg) -> DataError:
    path = _write(tmp_path, table)
    with pytest.raises(DataError) as info:
        read_records(path, DataConfig(source=path, **cfg))
    return info.value


# -- bundled -----------------------------------------------------------------------------


def test_digits_shapes_dtypes_and_owners(tmp_path):
    rec = load_dataset(DataConfig(), Storage(tmp_path))
    assert len(rec) == 1797
    assert rec.sample_ids.dtype == np.int64 and rec.labels.dtype == np.int64
    assert rec.features.dtype == np.float32 and rec.features.shape == (1797, 64)
    assert rec.features.flags.c_contiguous
    assert rec.feature_shape == (1, 8, 8) and rec.num_features == 64
    assert rec.shaped_features.shape == (1797, 1, 8, 8)
    assert rec.num_classes == 10 and set(np.unique(rec.labels)) == set(range(10))
    assert 0.0 <= rec.features.min() and rec.features.max() <= 1.0
    assert len(np.unique(rec.sample_ids)) == 1797 and np.all(np.diff(rec.sample_ids) > 0)
    assert rec.owner_ids.dtype.kind in "UO" and str(rec.owner_ids[0]).startswith("owner-")
    _, sizes = np.unique(rec.owner_ids, return_counts=True)
    assert 3.0 <= sizes.mean() <= 5.0 and np.median(sizes) >= 3 and sizes.min() >= 1
    assert (tmp_path / "datasets" / f"{bundled_name(DataConfig())}.parquet").exists()


def test_bundled_second_load_reuses_parquet(tmp_path, monkeypatch):
    storage = Storage(tmp_path)
    cfg = DataConfig(source="synthetic", synthetic=SyntheticConfig(n_samples=200))
    first = load_dataset(cfg, storage)
    digits = load_dataset(DataConfig(), storage)
    assert storage.exists(dataset_path("synthetic-purchase-n200-f600-c100-spo5-s0"))

    def boom(*_a, **_k):
        raise AssertionError("regenerated instead of reusing the stored parquet")

    # load_dataset calls the generators by their names in the bundled module.
    monkeypatch.setattr(bundled_mod, "make_synthetic", boom)
    monkeypatch.setattr(bundled_mod, "make_digits", boom)
    again = load_dataset(cfg, storage)
    np.testing.assert_array_equal(first.features, again.features)
    np.testing.assert_array_equal(first.owner_ids, again.owner_ids)
    _assert_same(digits, load_dataset(DataConfig(), storage))


@pytest.mark.parametrize(
    "cfg",
    [
        DataConfig(),
        DataConfig(source="synthetic", synthetic=SyntheticConfig(preset="custom", n_samples=30)),
        DataConfig(source="mnist1d", mnist1d={"n_samples": 50}),
    ],
    ids=lambda c: c.source,
)
def test_bundled_file_of_another_generator_is_made_again(tmp_path, cfg):
    storage = Storage(tmp_path)
    rel = dataset_path(bundled_name(cfg))
    fresh = load_dataset(cfg, storage)
    table = storage.read_table(rel)
    stale = table.slice(0, 5).replace_schema_metadata(
        {**table.schema.metadata, b"ray_unlearn.generator": b"an-older-generator"}
    )
    storage.write_table(rel, stale)
    _assert_same(fresh, load_dataset(cfg, storage))  # all rows again, not the 5 stale ones
    assert (
        storage.read_table(rel).schema.metadata[b"ray_unlearn.generator"] != b"an-older-generator"
    )


def test_synthetic_purchase_preset_and_determinism(tmp_path):
    cfg = SyntheticConfig(n_samples=300, seed=3)
    rec = load_dataset(DataConfig(source="synthetic", synthetic=cfg), Storage(tmp_path))
    assert rec.features.shape == (300, 600) and rec.feature_shape == (600,)
    assert set(np.unique(rec.features)) <= {0.0, 1.0}
    assert rec.num_classes == 100 and len(np.unique(rec.labels)) == 100
    assert 0.02 < rec.features.mean() < 0.3  # sparse purchase vectors
    _, sizes = np.unique(rec.owner_ids, return_counts=True)
    assert 4.0 <= sizes.mean() <= 6.0

    assert make_synthetic(cfg).equals(make_synthetic(cfg))
    other = make_synthetic(cfg.model_copy(update={"seed": 4}))
    assert not make_synthetic(cfg).column("features").equals(other.column("features"))


def test_synthetic_custom_preset(tmp_path):
    cfg = DataConfig(source="synthetic", synthetic=SyntheticConfig(preset="custom", n_samples=50))
    rec = load_dataset(cfg, Storage(tmp_path))
    assert rec.features.shape == (50, 20) and rec.num_classes == 4
    rec = load_dataset(
        DataConfig(
            source="synthetic",
            synthetic=SyntheticConfig(preset="custom", n_samples=40, n_features=6, n_classes=3),
        ),
        Storage(tmp_path),
    )
    assert rec.features.shape == (40, 6) and set(np.unique(rec.labels)) == {0, 1, 2}


def test_config_validation():
    with pytest.raises(ValidationError, match="n_samples"):
        SyntheticConfig(n_samples=5)
    with pytest.raises(
        ValidationError, match=r"unknown bundled dataset 'digit' \(did you mean 'digits'\?\)"
    ):
        DataConfig(source="digit")
    with pytest.raises(ValidationError, match="test_fraction"):
        DataConfig(test_fraction=1.0)
    with pytest.raises(ValidationError, match="positive sizes"):
        DataConfig(feature_shape=[1, 0])
    with pytest.raises(ValidationError, match="Extra inputs"):
        DataConfig(sorce="digits")
    with pytest.raises(ValidationError, match="exceeds n_samples"):
        SyntheticConfig(n_samples=50)  # purchase: 100 classes
    assert DataConfig(source="s3://bucket/key.parquet").source == "s3://bucket/key.parquet"


def test_column_settings_with_a_bundled_source_are_config_errors():
    """A bundled source's columns are its own: a column setting meant for a Parquet source
    is refused, naming the fields and what is allowed, never silently ignored."""
    with pytest.raises(ValidationError) as e:
        DataConfig(features_column="emb", label_column="y")
    msg = str(e.value)
    assert "data.source is the bundled 'digits', whose columns are fixed (label 'label')" in msg
    assert "data.features_column ('emb') and data.label_column ('y') are for a Parquet" in msg
    assert "unset them, or set data.source to a Parquet file or directory" in msg
    for source in ("synthetic", "mnist1d"):
        with pytest.raises(ValidationError, match=r"data.image_column \('img'\) is for a Parq"):
            DataConfig(source=source, image_column="img")
    with pytest.raises(ValidationError, match=r"data.text_column \('text'\) is for a Parquet"):
        DataConfig(text_column="text")  # digits has no texts
    with pytest.raises(ValidationError, match=r"fixed \(label 'label', texts 'text'\)"):
        DataConfig(source="bbcnews", text_column="body")
    # what the bundled tables do hold is allowed, and a Parquet source takes any column
    assert DataConfig(source="bbcnews", text_column="text").text_column == "text"
    assert DataConfig(label_column="label").label_column == "label"
    cfg = DataConfig(source="d.parquet", features_column="emb", label_column="y")
    assert (cfg.features_column, cfg.label_column) == ("emb", "y")
    # through a run's config: a config error with every problem at once
    from ray_unlearn.platform.core.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(
            os.path.join(CONFIGS, "digits.yaml"),
            ["data.features_column=emb", "partition.shards=0"],
        )
    assert "data.features_column ('emb') is for a Parquet source" in str(e.value)
    assert "partition.shards" in str(e.value)


# -- Parquet round trip ------------------------------------------------------------------


def _assert_same(a: Records, b: Records) -> None:
    np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
    np.testing.assert_array_equal(a.owner_ids.astype(str), b.owner_ids.astype(str))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.features, b.features)
    assert (a.num_classes, a.feature_shape) == (b.num_classes, b.feature_shape)


def test_write_read_round_trip_path_and_file_uri(tmp_path):
    rec = load_dataset(DataConfig(), Storage(tmp_path / "root")).subset(np.arange(0, 1797, 7))
    path = tmp_path / "out" / "digits.parquet"
    write_records(rec, path)
    _assert_same(rec, read_records(str(path), DataConfig()))
    uri = f"file://{tmp_path}/uri/sub/digits.parquet"
    write_records(rec, uri)
    back = read_records(uri, DataConfig())
    _assert_same(rec, back)
    assert back.feature_shape == (1, 8, 8)  # kept in the file's metadata
    flat = read_records(uri, DataConfig(feature_shape=[64]))
    assert flat.feature_shape == (64,)
    # load_dataset dispatches a path source to read_records
    _assert_same(rec, load_dataset(DataConfig(source=uri), Storage(tmp_path / "root")))


def test_read_numeric_columns_int_owners_and_float_labels(tmp_path):
    table = pa.table(
        {
            "label": pa.array([1.0, 0.0, 2.0, 1.0]),
            "x1": pa.array([0.5, 1.5, 2.5, 3.5]),
            "owner_id": pa.array([7, 7, 8, 9]),
            "sample_id": pa.array([3, 1, 2, 0], pa.int32()),
            "x2": pa.array([1, 2, 3, 4], pa.int8()),
            "note": pa.array(["a", "b", "c", "d"]),
        }
    )
    rec = read_records(_write(tmp_path, table), DataConfig())
    np.testing.assert_array_equal(rec.sample_ids, [0, 1, 2, 3])  # sorted by sample id
    np.testing.assert_array_equal(rec.owner_ids, ["9", "7", "8", "7"])
    np.testing.assert_array_equal(rec.labels, [1, 0, 2, 1])
    np.testing.assert_array_equal(rec.features, [[3.5, 4], [1.5, 2], [2.5, 3], [0.5, 1]])
    assert rec.num_classes == 3 and rec.feature_shape == (2,)


def test_explicit_columns_and_num_classes(tmp_path):
    table = _table(y=pa.array(np.arange(20) % 2), emb=pa.array(np.ones((20, 6)).tolist()))
    path = _write(tmp_path, table)
    rec = read_records(
        path,
        DataConfig(
            source=path,
            label_column="y",
            features_column="emb",
            num_classes=5,
            feature_shape=[2, 3],
        ),
    )
    assert rec.features.shape == (20, 6) and rec.feature_shape == (2, 3) and rec.num_classes == 5
    np.testing.assert_array_equal(rec.labels, np.arange(20) % 2)


# -- bad input ---------------------------------------------------------------------------


def test_duplicate_ids(tmp_path):
    err = _problems(tmp_path, _table(sample_id=pa.array([5, 5, 6, 6] + list(range(10, 26)))))
    assert "duplicate sample ids" in str(err) and "5, 6" in str(err)


def test_missing_column_lists_existing(tmp_path):
    err = _problems(tmp_path, _table(owner_id=None))
    assert "missing column(s) 'owner_id'" in str(err)
    assert "columns present: sample_id, label, features" in str(err)
    err = _problems(tmp_path, _table(), label_column="target")
    assert "'target'" in str(err)
    err = _problems(tmp_path, _table(features=None, emb=pa.array([[1.0]] * 20)))
    assert "no features found" in str(err) and "list columns here: emb" in str(err)


def test_nan_and_inf_features_name_sample_ids(tmp_path):
    feats = np.zeros((20, 4), np.float32)
    feats[3, 1] = np.nan
    feats[7, 0] = np.inf
    err = _problems(tmp_path, _table(features=pa.array(feats.tolist(), pa.list_(pa.float32()))))
    assert "NaN or inf" in str(err) and "sample_id 103, 107" in str(err)


def test_labels_out_of_range_negative_and_non_integer(tmp_path):
    err = _problems(tmp_path, _table(), num_classes=2)
    assert (
        "labels out of range" in str(err) and "[0, 2)" in str(err) and "sample_id 102" in str(err)
    )
    err = _problems(tmp_path, _table(label=pa.array([-1] + [0] * 19)))
    assert "labels out of range" in str(err) and "-1" in str(err)
    err = _problems(tmp_path, _table(label=pa.array([0.5] + [1.0] * 19)))
    assert "non-integer labels" in str(err) and "0.5" in str(err)
    err = _problems(tmp_path, _table(label=pa.array(["cat"] * 20)))
    assert "integer class indices" in str(err)


def test_ragged_features(tmp_path):
    rows = [[0.0, 1.0, 2.0]] * 18 + [[1.0], [1.0, 2.0, 3.0, 4.0]]
    err = _problems(tmp_path, _table(features=pa.array(rows)))
    assert "ragged" in str(err) and "sample_id 118, 119" in str(err) and "lengths 1, 4" in str(err)


def test_bad_feature_shape(tmp_path):
    err = _problems(tmp_path, _table(d=4), feature_shape=[3, 3])
    assert "feature_shape [3, 3] has 9 values" in str(err) and "D=4" in str(err)


def test_null_owner_empty_and_unreadable(tmp_path):
    err = _problems(tmp_path, _table(owner_id=pa.array([None, "a"] + ["b"] * 18)))
    assert "null owner id" in str(err) and "sample_id 100" in str(err)
    err = _problems(tmp_path, _table().slice(0, 0))
    assert "empty" in str(err)
    with pytest.raises(DataError, match="no file or directory"):
        read_records(str(tmp_path / "nope.parquet"), DataConfig())
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read .* as Parquet"):
        read_records(str(tmp_path / "junk.parquet"), DataConfig())


def test_all_problems_reported_together(tmp_path):
    feats = np.zeros((20, 4))
    feats[2, 2] = np.nan
    table = _table(
        sample_id=pa.array([1, 1] + list(range(2, 20))),
        label=pa.array([9] + [0] * 19),
        features=pa.array(feats.tolist()),
    )
    err = _problems(tmp_path, table, num_classes=3)
    assert len(err.problems) == 3
    text = str(err)
    assert "3 problem(s)" in text and "d.parquet" in text
    for needle in ("duplicate sample ids", "NaN or inf", "labels out of range"):
        assert needle in text


# -- records and split -------------------------------------------------------------------


def _small(n: int = 500) -> Records:
    cfg = SyntheticConfig(preset="custom", n_samples=n, n_features=3, n_classes=2)
    return parquet_mod._records_from_table(make_synthetic(cfg), "test")


def test_records_subset_index_of_owners():
    rec = _small(50)
    assert rec.index_of([10, 3]).tolist() == [10, 3]
    with pytest.raises(DataError, match="unknown sample ids .*: 77, 99"):
        rec.index_of([99, 5, 77])
    sub = rec.subset(rec.labels == 1)
    assert len(sub) == int((rec.labels == 1).sum()) and np.all(sub.labels == 1)
    assert rec.subset([4, 2]).sample_ids.tolist() == [4, 2]
    assert len(rec.subset(slice(0, 10))) == 10
    owner = rec.owner_ids[7]
    assert 7 in rec.sample_ids_of_owners([owner]).tolist()
    with pytest.raises(DataError, match="unknown owner ids"):
        rec.sample_ids_of_owners(["nobody"])
    assert rec.to_table().schema.field("features").type == pa.list_(pa.float32(), 3)


def test_records_arrays_are_writable_whatever_their_input(tmp_path):
    """torch.from_numpy shares a Records array's memory and warns on a read-only one (an
    Arrow column's zero-copy view, as a run's copy of its data gives): Records copies such
    an input once, and only such an input."""
    rec = _small(20)
    write_records(rec, tmp_path / "d.parquet")
    back = read_records(tmp_path / "d.parquet", DataConfig())
    # the Parquet reader's float32 list column comes zero-copy, i.e. read-only
    col = pq.read_table(tmp_path / "d.parquet").column("features").combine_chunks().flatten()
    assert not col.to_numpy(zero_copy_only=False).flags.writeable
    for r in (rec, back):
        assert all(a.flags.writeable for a in (r.sample_ids, r.labels, r.features))
    frozen = [rec.sample_ids.copy(), rec.labels.copy(), rec.features.copy()]
    for a in frozen:
        a.flags.writeable = False
    r = Records(frozen[0], rec.owner_ids, frozen[1], frozen[2], 2, (3,))
    assert all(a.flags.writeable for a in (r.sample_ids, r.labels, r.features))
    assert not any(a.flags.writeable for a in frozen)  # the inputs were copied, not changed
    np.testing.assert_array_equal(r.features, rec.features)
    r2 = Records(rec.sample_ids, rec.owner_ids, rec.labels, rec.features, 2, (3,))
    assert r2.features is rec.features  # a writable float32 input is not copied


def test_split_deterministic_and_sorted():
    rec = _small()
    train, test = split_train_test(rec, 0.2, seed=1)
    again_train, again_test = split_train_test(rec, 0.2, seed=1)
    assert train.sample_ids.tolist() == again_train.sample_ids.tolist()
    assert test.sample_ids.tolist() == again_test.sample_ids.tolist()
    assert len(train) + len(test) == len(rec) and 0.1 < len(test) / len(rec) < 0.3
    assert not set(train.sample_ids) & set(test.sample_ids)
    assert np.all(np.diff(train.sample_ids) > 0) and np.all(np.diff(test.sample_ids) > 0)
    other, _ = split_train_test(rec, 0.2, seed=2)
    assert other.sample_ids.tolist() != train.sample_ids.tolist()
    shuffled = rec.subset(np.random.default_rng(0).permutation(len(rec)))
    assert (
        split_train_test(shuffled, 0.2, seed=1)[1].sample_ids.tolist() == test.sample_ids.tolist()
    )
    all_train, none = split_train_test(rec, 0.0, seed=1)
    assert len(all_train) == len(rec) and len(none) == 0 and none.features.shape == (0, 3)


def test_split_stable_under_deletion():
    rec = _small()
    train, test = split_train_test(rec, 0.25, seed=7)
    keep = np.random.default_rng(1).random(len(rec)) > 0.3
    train2, test2 = split_train_test(rec.subset(keep), 0.25, seed=7)
    kept = set(rec.sample_ids[keep].tolist())
    assert set(train2.sample_ids.tolist()) == set(train.sample_ids.tolist()) & kept
    assert set(test2.sample_ids.tolist()) == set(test.sample_ids.tolist()) & kept
