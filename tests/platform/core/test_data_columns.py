"""Tensor and image feature columns: read, shaped and validated at load, bad rows named."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from ray_unlearn.platform.core.data import DataConfig, DataError, read_records
from ray_unlearn.platform.core.data.columns import decode_image


def _base(n: int) -> dict[str, pa.Array]:
    return {
        "sample_id": pa.array(np.arange(100, 100 + n), pa.int64()),
        "owner_id": pa.array([f"o{i}" for i in range(n)]),
        "label": pa.array(np.arange(n) % 2, pa.int64()),
    }


def _read(tmp_path, columns: dict, **cfg):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({**_base(len(next(iter(columns.values())))), **columns}), path)
    return read_records(path, DataConfig(source=str(path), **cfg))


def _errors(tmp_path, columns: dict, **cfg) -> str:
    with pytest.raises(DataError) as e:
        _read(tmp_path, columns, **cfg)
    return str(e.value)


# -- tensors ---------------------------------------------------------------------------------


def test_nested_list_column_is_a_tensor_with_its_shape(tmp_path):
    x = np.random.default_rng(0).random((6, 2, 3, 4)).astype(np.float32)
    rec = _read(tmp_path, {"features": pa.array(x.tolist())})
    assert rec.feature_shape == (2, 3, 4)
    np.testing.assert_array_equal(rec.shaped_features, x)  # row-major, values exact
    # a declared shape with the same number of values wins (a reshape)
    rec = _read(tmp_path, {"features": pa.array(x.tolist())}, feature_shape=[6, 4])
    assert rec.feature_shape == (6, 4)


def test_fixed_size_list_with_declared_shape_and_fixed_shape_tensor(tmp_path):
    x = np.arange(5 * 12, dtype=np.float32).reshape(5, 12)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 12)
    rec = _read(tmp_path, {"emb": flat}, features_column="emb", feature_shape=[3, 4])
    assert rec.feature_shape == (3, 4) and np.array_equal(rec.features, x)
    tensor = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), [3, 4]), flat)
    rec = _read(tmp_path, {"features": tensor})
    assert rec.feature_shape == (3, 4) and np.array_equal(rec.features, x)
    err = _errors(tmp_path, {"emb": flat}, features_column="emb", feature_shape=[5, 5])
    assert "feature_shape [5, 5] has 25 values" in err and "D=12" in err


def test_bad_tensor_rows_are_named(tmp_path):
    ok = [[1.0, 2.0], [3.0, 4.0]]
    err = _errors(tmp_path, {"features": pa.array([ok, ok, [[1.0], [2.0, 3.0]], ok])})
    assert "ragged at dimension 1" in err and "sample_id 102" in err and "lengths 1" in err
    err = _errors(tmp_path, {"features": pa.array([ok, None, ok])})
    assert "features column 'features' has null rows at sample_id 101" in err
    err = _errors(tmp_path, {"features": pa.array([ok, [[1.0, None], [2.0, 3.0]], ok])})
    assert "null values inside rows at sample_id 101" in err
    err = _errors(tmp_path, {"features": pa.array([ok, [None, [1.0, 2.0]], ok])})
    assert "null lists at dimension 1 at sample_id 101" in err
    err = _errors(tmp_path, {"features": pa.array([[["a"]], [["b"]]])})
    assert "must be a list of numbers" in err and "fixed_shape_tensor" in err
    nan = [[1.0, float("nan")], [3.0, 4.0]]
    err = _errors(tmp_path, {"features": pa.array([ok, ok, nan])})
    assert "NaN or inf" in err and "sample_id 102" in err


# -- images ----------------------------------------------------------------------------------


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_png_and_jpeg_columns_decode_to_chw_in_unit_range(tmp_path):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (4, 5, 7), dtype=np.uint8)
    rec = _read(
        tmp_path, {"img": pa.array([_png(g) for g in grey], pa.binary())}, image_column="img"
    )
    assert rec.feature_shape == (1, 5, 7)
    np.testing.assert_allclose(rec.shaped_features[:, 0], grey / 255.0, rtol=0, atol=1e-7)

    rgb = rng.integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
    rec = _read(
        tmp_path, {"img": pa.array([_png(c, "JPEG") for c in rgb], pa.binary())}, image_column="img"
    )
    assert rec.feature_shape == (3, 6, 6)
    assert rec.features.min() >= 0.0 and rec.features.max() <= 1.0
    # the same as decoding one file by hand, channel first
    np.testing.assert_array_equal(rec.shaped_features[0], decode_image(_png(rgb[0], "JPEG")))


def test_image_transform_args_and_a_custom_transform(tmp_path):
    imgs = [_png(np.full((4, 4), 10 * i, np.uint8)) for i in range(3)] + [
        _png(np.zeros((8, 6), np.uint8))
    ]
    col = {"img": pa.array(imgs, pa.binary())}
    err = _errors(tmp_path, col, image_column="img")
    assert "most images decode to shape [1, 4, 4]" in err and "sample_id 103" in err
    assert "[1, 8, 6]" in err and "image_transform_args.size" in err
    rec = _read(
        tmp_path, col, image_column="img", image_transform_args={"size": [4, 4], "mode": "RGB"}
    )
    assert rec.feature_shape == (3, 4, 4)
    rec = _read(
        tmp_path,
        col,
        image_column="img",
        image_transform="tests.platform.core.test_data_columns:mean_pixel",
    )
    assert rec.feature_shape == (1,) and rec.features[1, 0] == pytest.approx(10.0)


def mean_pixel(data: bytes) -> np.ndarray:
    """A user's decoder named by import path: one feature, the mean grey level."""
    return np.array([np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float32).mean()])


def test_bad_images_are_named_with_what_is_allowed(tmp_path):
    good = _png(np.zeros((3, 3), np.uint8))
    gif = io.BytesIO()
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(gif, format="GIF")
    col = {"img": pa.array([good, b"not an image", good, gif.getvalue(), None], pa.binary())}
    err = _errors(tmp_path, col, image_column="img")
    assert "null images at sample_id 104" in err
    col = {"img": pa.array([good, b"not an image", good, gif.getvalue()], pa.binary())}
    err = _errors(tmp_path, col, image_column="img")
    assert "cannot be decoded at sample_id 101" in err and "UnidentifiedImageError" in err
    assert "sample_id 103" in err and "a GIF image; allowed: PNG, JPEG" in err
    err = _errors(tmp_path, {"img": pa.array([1.0, 2.0])}, image_column="img")
    assert "image column 'img' must hold encoded image bytes" in err
    err = _errors(tmp_path, {"pic": pa.array([good], pa.binary())}, image_column="img")
    assert "missing column(s) 'img'" in err


def test_image_config_is_checked_at_load(tmp_path):
    with pytest.raises(ValidationError, match="each name the features"):
        DataConfig(image_column="img", features_column="emb")
    with pytest.raises(ValidationError, match="cannot import 'no_such_module'"):
        DataConfig(image_column="img", image_transform="no_such_module:f")
    with pytest.raises(ValidationError, match="decode data.image_column: set it too"):
        DataConfig(image_transform_args={"size": [4, 4]})
    with pytest.raises(ValidationError) as err:  # every problem at once
        DataConfig(image_column="img", features_column="emb", image_transform="no_such_module:f")
    assert "each name the features" in str(err.value) and "cannot import" in str(err.value)


def test_an_image_run_trains_on_its_decoded_copy(tmp_path):
    # digits as 8 x 8 PNGs: the run's copy holds the decoded tensors, a shard reads its own
    from sklearn.datasets import load_digits

    from ray_unlearn.platform.core.config import load_config
    from ray_unlearn.platform.core.run import create_run, open_run
    from ray_unlearn.platform.core.training import train_run_shard

    x, y = load_digits(return_X_y=True)
    x, y = x[:240], y[:240]
    pixels = (x * 255 / 16).round().astype(np.uint8).reshape(-1, 8, 8)
    src = tmp_path / "digits_png.parquet"
    pq.write_table(
        pa.table(
            {
                "sample_id": pa.array(np.arange(len(y)), pa.int64()),
                "owner_id": pa.array([f"o{i // 2}" for i in range(len(y))]),
                "label": pa.array(y, pa.int64()),
                "png": pa.array([_png(p) for p in pixels], pa.binary()),
            }
        ),
        src,
    )
    cfg = load_config(
        None,
        [
            f"storage={tmp_path / 'store'}",
            f"data.source={src}",
            "data.image_column=png",
            "partition.shards=2",
            "partition.slices=2",
            "model.kind=cnn",
            "model.channels=[4]",
            "training.epochs=1",
        ],
    )
    made = create_run(cfg)
    assert made.feature_shape == (1, 8, 8) and made.num_classes == 10
    ctx = open_run(made.storage.uri, made.run_id)
    data = ctx.shard_data(0)
    pos = data.sample_ids
    expect = torch.from_numpy(pixels[pos].astype(np.float32).reshape(len(pos), -1) / 255.0)
    assert torch.equal(data.features, expect)
    stage = next(train_run_shard(ctx, 0))
    assert stage.metrics["steps"] > 0 and np.isfinite(stage.metrics["loss"])
