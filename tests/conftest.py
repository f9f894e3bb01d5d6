"""Shared fixtures: tiny runs trained in-process, and one Ray session for the whole test run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterable

import numpy as np
import pytest
import torch

from ray_unlearn.platform.core.config import load_config
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.core.training import ShardData, train_shard

# Every executor a test starts serves its control endpoint on the loopback interface only
# (not the Ray node's address); a test that needs another value sets it with monkeypatch.
os.environ.setdefault("RAY_UNLEARN_CONTROL_HOST", "127.0.0.1")

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))  # the repository

# Small and quick: digits, 3 shards x 3 slices, 2 epochs.
TINY = ["training.epochs=2", "partition.shards=3", "partition.slices=3", "model.hidden=[32]"]


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (benchmarks are scripts, not a package),
    so that a test can call its functions."""
    spec = importlib.util.spec_from_file_location(
        f"{name}_bench", os.path.join(ROOT, "benchmarks", f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_config(tmp_path, *overrides: str):
    return load_config(
        os.path.join(CONFIGS, "digits.yaml"), [f"storage={tmp_path / 'store'}", *TINY, *overrides]
    )


def assert_equals_scratch(ctx, shard: int, deleted_ids) -> list:
    """The published model of ``shard`` is bitwise the shard trained from scratch without
    ``deleted_ids`` (same config and seed); returns the scratch stages (StageResult list)."""
    torch.set_num_threads(1)
    cfg = ctx.config
    scratch = train_shard(
        ctx.shard_data(shard, exclude=deleted_ids),
        cfg.model,
        cfg.training,
        seed=cfg.seed,
        feature_shape=ctx.feature_shape,
        num_classes=ctx.num_classes,
    )
    live = ctx.model_store.load_state(ctx.model_store.registry().shards[shard].chain[-1])
    assert all(torch.equal(live[n], scratch[-1].state[n]) for n in live)
    return scratch


def imported_by(code: str, watched: Iterable[str]) -> list[str]:
    """Which of ``watched`` (module names) a fresh interpreter has imported after running
    ``code``: a subprocess, since this one has long imported everything; it imports
    ray_unlearn from this tree (first on its PYTHONPATH)."""
    watched = tuple(watched)
    mark = "imported-by-probe:"
    probe = f"{code}\nimport sys\nprint('\\n{mark}' + ','.join(m for m in {watched!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    if res.returncode:
        raise AssertionError(f"the probe failed:\n{res.stderr[-2000:]}")
    line = res.stdout.rsplit(mark, 1)[-1].strip()
    return [m for m in line.split(",") if m]


# The tiny BERTs' words: a word-piece vocabulary small enough to build in a test.
BERT_WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "one", "two", "three"]


def save_tiny_bert(d, *, hidden: int, layers: int, max_positions: int) -> str:
    """A tiny random BERT (2 heads, feed-forward 2 x hidden) and its word-piece tokenizer
    over :data:`BERT_WORDS`, saved into ``d`` with ``save_pretrained`` so the loaders take
    their real path; weights drawn after ``torch.manual_seed(0)``. Returns ``str(d)``."""
    import transformers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(d)
    return str(d)


def random_label_shadows(n: int, d: int, classes: int, model, training, seed: int = 0):
    """(MLPShadowTrainer, x, y) on ``n`` random rows of ``d`` features with random labels
    among ``classes``: nothing generalises, so a shadow's confidence on a row is high only
    if it trained on it (the known answer)."""
    from ray_unlearn.platform.eval.lira import MLPShadowTrainer

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, classes, n)
    return MLPShadowTrainer(x, y, model, training, (d,), classes, seed=seed), x, y


@pytest.fixture
def tiny_run(tmp_path):
    """A trained tiny run (no Ray): returns its RunContext."""
    ctx = create_run(tiny_config(tmp_path))
    train_all_shards(ctx)
    return ctx


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for every integration test (ray.init takes ~5 s: start it once)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, namespace="ray_unlearn", log_to_driver=False)
    yield ray
    ray.shutdown()


# CUDA tests: marked `gpu` (benchmarks/gpu_check.sh runs `pytest -m gpu`) and skipped, with
# the reason, where there is no GPU.
_NO_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"needs a CUDA GPU (torch {torch.__version__}, CUDA available: no)",
)


def needs_cuda(test):
    return pytest.mark.gpu(_NO_CUDA(test))


@pytest.fixture
def no_ray_grant():
    """The test runs as a process Ray said nothing about (no GPU grant recorded); use with
    ``pytestmark = pytest.mark.usefixtures("no_ray_grant")``."""
    from ray_unlearn.platform.core import device as dev

    before = dev._ray_gpus
    dev._ray_gpus = None
    yield
    dev._ray_gpus = before


def sliced_shard_data(per_slice: int, seed: int, shard: int, num_slices: int = 3) -> ShardData:
    """A shard of ``per_slice`` random rows (5 features, 3 classes) in each of ``num_slices``
    slices, sample ids from 100."""
    g = torch.Generator().manual_seed(seed)
    n = per_slice * num_slices
    return ShardData(
        shard=shard,
        sample_ids=np.arange(100, 100 + n, dtype=np.int64),
        slices=np.repeat(np.arange(num_slices, dtype=np.int32), per_slice),
        features=torch.randn(n, 5, generator=g),
        labels=torch.randint(0, 3, (n,), generator=g),
        num_slices=num_slices,
    )
