"""The train/test split: a sample's side is decided from ``(seed, sample_id)`` alone, so
deleting rows never moves another sample between train and test."""

from __future__ import annotations

import numpy as np

from ray_unlearn.platform.core.data.records import DataError, Records

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def held_out_mask(sample_ids: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """True where a sample is held out: ``hash(seed, sample_id) < test_fraction``.

    Depends on nothing but ``(seed, sample_id)``, so a sample never changes sides when
    other rows are added or deleted.
    """
    ids = np.ascontiguousarray(sample_ids, dtype=np.int64).view(np.uint64)
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    u = (_splitmix64(ids ^ key) >> np.uint64(11)).astype(np.float64) * (2.0**-53)
    return u < test_fraction


def split_train_test(records: Records, test_fraction: float, seed: int) -> tuple[Records, Records]:
    """(train, test), each sorted by sample id; a sample's side depends only on
    ``(seed, sample_id)`` (see :func:`held_out_mask`), about ``test_fraction`` of rows in test.

    Raises :class:`DataError` if ``test_fraction`` is outside [0, 1) or the train side
    would be empty.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    order = np.argsort(records.sample_ids, kind="stable")
    held = held_out_mask(records.sample_ids[order], test_fraction, seed)
    if len(records) and held.all():
        raise DataError(
            f"the train split is empty: all {len(records)} samples hashed to test "
            f"(test_fraction={test_fraction}, seed={seed}); use more data or a smaller fraction"
        )
    return records.subset(order[~held]), records.subset(order[held])
