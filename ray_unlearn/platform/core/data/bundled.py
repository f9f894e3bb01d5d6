"""Bundled sources that need no download, materialised once as Parquet under the storage
root so every process of a run (and every rerun) sees byte-identical data: ``digits``
(scikit-learn's 8x8 digits), ``synthetic`` (a Purchase-100-like generator, or Gaussian
blobs), ``mnist1d`` (MNIST-1D, generated offline, :mod:`.mnist1d`) and ``bbcnews`` (news
texts, :mod:`.text`). :func:`load_dataset` is the entry point for any configured source.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from ray_unlearn.platform.core.data.config import (
    BUNDLED,
    DataConfig,
    Mnist1dConfig,
    SyntheticConfig,
)
from ray_unlearn.platform.core.data.mnist1d import (
    CLASSES,
    FEATURES,
    MNIST1D_GENERATOR,
    generate_mnist1d,
)
from ray_unlearn.platform.core.data.parquet import _read_metadata, _records_from_table, read_records
from ray_unlearn.platform.core.data.records import DataError, Records
from ray_unlearn.platform.core.data.text import (
    BBC_GENERATOR,
    TEXT,
    TextEncoder,
    make_bbcnews,
)
from ray_unlearn.platform.core.storage import Storage, dataset_path

# Version of the generator that produced a bundled file; a cached file with another tag is
# regenerated (so changing a generator never silently reuses stale data).
_META_GENERATOR = b"ray_unlearn.generator"
_DIGITS_GENERATOR = "digits-v1"
_SYNTHETIC_GENERATOR = "synthetic-v1"


def _fmt(x: float) -> str:
    return f"{x:g}"


def _owners(n: int, samples_per_owner: float, rng: np.random.Generator) -> np.ndarray:
    """Owner ids ``owner-00042`` for ``n`` samples, in a seeded random grouping.

    Sizes are ``1 + Poisson(samples_per_owner - 1)`` (mean ``samples_per_owner``, at
    least 1), trimmed to add up to ``n``; samples are dealt to owners in a random order.
    """
    sizes = 1 + rng.poisson(samples_per_owner - 1.0, size=n)
    ends = np.cumsum(sizes)
    n_owners = int(np.searchsorted(ends, n)) + 1
    sizes = sizes[:n_owners]
    sizes[-1] -= int(ends[n_owners - 1]) - n
    owner_of = np.empty(n, dtype=np.int64)
    owner_of[rng.permutation(n)] = np.repeat(np.arange(n_owners), sizes)
    width = max(5, len(str(n_owners - 1)))
    return np.char.add("owner-", np.char.zfill(owner_of.astype(str), width))


def _table(
    features: np.ndarray,
    labels: np.ndarray,
    owners: np.ndarray,
    num_classes: int,
    feature_shape: tuple[int, ...],
    generator: str,
) -> pa.Table:
    rec = Records(np.arange(len(labels)), owners, labels, features, num_classes, feature_shape)
    table = rec.to_table()
    meta = dict(table.schema.metadata)
    meta[_META_GENERATOR] = generator.encode()
    return table.replace_schema_metadata(meta)


def make_digits(samples_per_owner: float = 4.0, seed: int = 0) -> pa.Table:
    """scikit-learn's digits (1797 8x8 images, 10 classes; bundled, no download) as a table.

    Features are pixel intensities scaled from 0..16 to [0, 1]; feature_shape (1, 8, 8).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    feats = (np.asarray(d.data, dtype=np.float32) / 16.0).reshape(len(d.target), -1)
    rng = np.random.default_rng([seed, 2])
    owners = _owners(len(d.target), samples_per_owner, rng)
    return _table(feats, d.target, owners, 10, (1, 8, 8), _DIGITS_GENERATOR)


def _purchase(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Purchase-100-like data: binary "bought item j" vectors, one class per customer type.

    Each class c has a prototype P[c] of per-item purchase probabilities: a low base rate
    (0.05), a shared set of items for its group of ~10 related classes (probabilities
    0.2-0.5; the groups make classes confusable) and its own ~5% of the items (0.15-0.4).
    Each customer scales the probabilities by an activity level ~ Gamma(4, 1/4) (mean 1).
    An MLP 600-256-100 reaches about 80% test accuracy with 20k samples (and fits the
    training set), like the real benchmark.
    """
    n, d, c = cfg.n_samples, cfg.features, cfg.classes
    k_class = max(1, round(d * 30 / 600))
    k_group = max(1, round(d * 40 / 600))
    n_groups = max(1, c // 10)
    probs = np.full((c, d), 0.05, dtype=np.float32)
    group_items = np.argsort(rng.random((n_groups, d)), axis=1)[:, :k_group]
    group_probs = np.zeros((n_groups, d), dtype=np.float32)
    np.put_along_axis(
        group_probs, group_items, rng.uniform(0.2, 0.5, (n_groups, k_group)).astype(np.float32), 1
    )
    group_of = rng.integers(0, n_groups, c)
    probs = np.maximum(probs, group_probs[group_of])
    class_items = np.argsort(rng.random((c, d)), axis=1)[:, :k_class]
    own = rng.uniform(0.15, 0.4, (c, k_class)).astype(np.float32)
    np.put_along_axis(
        probs, class_items, np.maximum(np.take_along_axis(probs, class_items, 1), own), 1
    )

    labels = rng.integers(0, c, n)
    labels[rng.permutation(n)[:c]] = np.arange(c)  # every class present
    activity = rng.gamma(4.0, 0.25, n).astype(np.float32)
    feats = np.empty((n, d), dtype=np.float32)
    chunk = max(1, (1 << 22) // d)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        p = probs[labels[s:e]]
        p *= activity[s:e, None]
        feats[s:e] = rng.random((e - s, d), dtype=np.float32) < p
    return feats, labels


def _blobs(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes: unit-variance noise around class means spaced ~3 std apart."""
    n, d, c = cfg.n_samples, cfg.features, cfg.classes
    means = rng.standard_normal((c, d)).astype(np.float32) * np.float32(2.2 / math.sqrt(d))
    labels = rng.integers(0, c, n)
    labels[rng.permutation(n)[:c]] = np.arange(c)
    feats = means[labels] + rng.standard_normal((n, d), dtype=np.float32)
    return feats, labels


def make_synthetic(cfg: SyntheticConfig) -> pa.Table:
    """Generate the configured synthetic dataset as a table (deterministic in ``cfg``)."""
    rng = np.random.default_rng([cfg.seed, 0])
    feats, labels = (_purchase if cfg.preset == "purchase" else _blobs)(cfg, rng)
    owners = _owners(cfg.n_samples, cfg.samples_per_owner, np.random.default_rng([cfg.seed, 1]))
    return _table(feats, labels, owners, cfg.classes, (cfg.features,), _SYNTHETIC_GENERATOR)


def make_mnist1d(
    cfg: Mnist1dConfig | None = None, samples_per_owner: float = 4.0, seed: int = 0
) -> pa.Table:
    """MNIST-1D (:mod:`.mnist1d`) as a table: ``cfg.n_samples`` rows of 40 float32 features,
    10 classes, feature_shape (40,), generated with ``cfg.seed``; owners drawn with ``seed``
    as for digits."""
    cfg = cfg or Mnist1dConfig()
    x, y = generate_mnist1d(cfg.n_samples, cfg.seed)
    owners = _owners(len(y), samples_per_owner, np.random.default_rng([seed, 2]))
    return _table(x, y, owners, CLASSES, (FEATURES,), MNIST1D_GENERATOR)


def bundled_table(cfg: DataConfig) -> pa.Table:
    """The bundled table of ``cfg.source``, generated (not read from any cache)."""
    if cfg.source == "digits":
        return make_digits(cfg.samples_per_owner, cfg.seed)
    if cfg.source == "synthetic":
        return make_synthetic(cfg.synthetic)
    if cfg.source == "mnist1d":
        return make_mnist1d(cfg.mnist1d, cfg.samples_per_owner, cfg.seed)
    if cfg.source == "bbcnews":
        return make_bbcnews()
    raise DataError(f"{cfg.source!r} is not a bundled dataset; bundled: {', '.join(BUNDLED)}")


# The generator tag each bundled source's file carries (see _META_GENERATOR).
_GENERATORS = {
    "digits": _DIGITS_GENERATOR,
    "synthetic": _SYNTHETIC_GENERATOR,
    "mnist1d": MNIST1D_GENERATOR,
    "bbcnews": BBC_GENERATOR,
}


def bundled_name(cfg: DataConfig) -> str:
    """Dataset name under ``datasets/``; it names every parameter that changes the data."""
    if cfg.source == "digits":
        return f"digits-spo{_fmt(cfg.samples_per_owner)}-s{cfg.seed}"
    if cfg.source == "synthetic":
        s = cfg.synthetic
        return (
            f"synthetic-{s.preset}-n{s.n_samples}-f{s.features}-c{s.classes}"
            f"-spo{_fmt(s.samples_per_owner)}-s{s.seed}"
        )
    if cfg.source == "mnist1d":
        m = cfg.mnist1d
        return f"mnist1d-n{m.n_samples}-g{m.seed}-spo{_fmt(cfg.samples_per_owner)}-s{cfg.seed}"
    if cfg.source == "bbcnews":
        return "bbcnews"
    raise DataError(f"{cfg.source!r} is not a bundled dataset; bundled: {', '.join(BUNDLED)}")


def load_dataset(
    cfg: DataConfig, storage: Storage, encode_text: TextEncoder | None = None
) -> Records:
    """The configured dataset as :class:`Records`, sorted by sample id.

    Bundled sources are generated on first use and stored as
    ``datasets/<bundled_name>.parquet`` under ``storage``; later calls (any process) read
    that file. Other sources are read with :func:`read_records`. ``encode_text``: the
    model's tokenizer, for a text column (``bbcnews``, or ``data.text_column``).
    """
    if cfg.source not in BUNDLED:
        return read_records(cfg.source, cfg, encode_text)
    rel = dataset_path(bundled_name(cfg))
    text = {}
    if cfg.source == "bbcnews":  # read like any Parquet with a text column (`text`)
        text = {"text_column": cfg.text_column or TEXT, "encode_text": encode_text}
    return _records_from_table(
        _materialised(storage, rel, _GENERATORS[cfg.source], lambda: bundled_table(cfg)),
        f"{storage.uri.rstrip('/')}/{rel}",
        num_classes=cfg.num_classes,
        feature_shape=cfg.feature_shape,
        **text,
    )


def _materialised(
    storage: Storage, rel: str, generator: str, make: Callable[[], pa.Table]
) -> pa.Table:
    """The table stored at ``rel``; made with ``make()`` and written there first when the
    file is missing or carries another generator tag than ``generator`` (a changed generator
    never silently reuses stale data)."""
    table = storage.read_table(rel) if storage.exists(rel) else None
    if table is None or _read_metadata(table).get(_META_GENERATOR) != generator.encode():
        table = make()
        storage.write_table(rel, table)
    return table
