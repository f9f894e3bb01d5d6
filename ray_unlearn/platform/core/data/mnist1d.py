"""MNIST-1D as a bundled source, generated offline by the ``mnist1d`` package.

MNIST-1D (S. Greydanus and D. Kobak, 2020; package ``mnist1d``, Apache-2.0) turns ten 1-D
digit templates (12 points each) into length-40 signals by random padding, translation,
shear, scaling and correlated plus i.i.d. noise. It is small (40 features) but much harder
than scikit-learn's digits: an MLP reaches about 60-70% test accuracy and memorizes many
rows, so a deletion moves a retrained model more (what the RUM evaluation needs).

Only ``mnist1d.data.make_dataset`` is called, which generates the signals from the
package's templates in this process. ``mnist1d.get_dataset`` is never called: it would
download a pickle from GitHub.
"""

from __future__ import annotations

import random

import numpy as np

MNIST1D_GENERATOR = "mnist1d-v1"
FEATURES = 40  # the package's final_seq_length
CLASSES = 10


def generate_mnist1d(n_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, 40) float32, labels (n,) int64) from ``mnist1d.data.make_dataset`` with
    the package's default arguments, ``num_samples=n_samples`` and ``seed``.

    ``n_samples`` must be a multiple of 10 (the package makes ``n // 10`` rows per class).
    The package's own train/test split is undone (both parts are returned, in its order):
    the platform splits by sample id. ``make_dataset`` reseeds the global ``random`` and
    ``numpy.random`` generators; their states are restored afterwards."""
    if n_samples < CLASSES or n_samples % CLASSES:
        raise ValueError(f"mnist1d n_samples must be a positive multiple of 10, got {n_samples}")
    try:
        from mnist1d.data import get_dataset_args, make_dataset
        from mnist1d.utils import ObjectView
    except ImportError as e:  # an optional dependency (extra `mnist1d`)
        raise ImportError(
            "data.source=mnist1d needs the `mnist1d` package: pip install 'ray-unlearn[mnist1d]'"
        ) from e
    args = get_dataset_args(as_dict=True)
    args.update(num_samples=int(n_samples), seed=int(seed))
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(ObjectView(args))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
    y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
    return x, y
