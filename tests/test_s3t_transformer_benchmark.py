"""benchmarks/s3t_transformer.py without its data: the cached top layers are the model (a
tiny random BERT), the splits are disjoint, a shard process's peak RSS is its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import s3t_transformer as bench
from tests.conftest import BERT_WORDS as WORDS
from tests.conftest import save_tiny_bert

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
T = 10


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(
        tmp_path_factory.mktemp("tiny-bert"), hidden=16, layers=3, max_positions=16
    )


def test_cached_top_layers_give_the_full_models_logits(bert_dir, tmp_path):
    s = {"model": bert_dir, "n": None, "max_length": T, "num_blocks": 2}
    rng = np.random.default_rng(0)
    # lengths 1..8 words: rows with padding and rows without
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(1, 9))) for _ in range(12)]
    enc = bench.encode_cache(s, texts, tmp_path)
    assert enc["prefix"].shape == (12, T * 16 + T) and enc["pooled"].shape == (12, 16)
    assert bench.check_top(s, enc) < 1e-5
    # the full model's frozen, pooled output is what the cache holds as `pooled`
    full = bench.build_model(bench._mcfg(s), (T,), bench.NUM_CLASSES).eval()
    top = bench.TopEncoder(full, 2).eval()
    top.head = torch.nn.Identity()  # the pooled hidden state itself
    with torch.no_grad():
        pooled = top(torch.from_numpy(enc["prefix"])).numpy()
    np.testing.assert_allclose(pooled, enc["pooled"], atol=1e-5)
    # a second call reads the cache file (same arrays)
    again = bench.encode_cache(s, texts, tmp_path)
    np.testing.assert_array_equal(again["prefix"], enc["prefix"])


def test_split_is_disjoint_and_covers_the_rows():
    s = {"shards": 2, "slices": 3, "public_fraction": 0.1}
    sp = bench.Split(5, s, 400)
    parts = [sp.public, *sp.shards, sp.va, sp.te]
    allrows = np.concatenate(parts)
    assert len(allrows) == 400 and len(np.unique(allrows)) == 400
    assert len(sp.public) == 28 and len(sp.va) == 60
    for rows, slices in zip(sp.shards, sp.slices, strict=True):
        assert len(rows) == len(slices) and set(slices.tolist()) <= {0, 1, 2}
    other = bench.Split(6, s, 400)
    assert not np.array_equal(other.te, sp.te)  # the seed draws the split


def test_best_takes_the_first_of_equal_validation_scores():
    entries = [{"setting": 1, "val": 0.9}, {"setting": 2, "val": 0.95}, {"setting": 3, "val": 0.95}]
    assert bench._best(entries)["setting"] == 2


def test_peak_rss_is_the_childs_own_not_its_parents():
    big = np.ones(200 * 2**20 // 8)  # 200 MiB held here, the parent  # noqa: F841
    code = "from benchmarks.s3t_transformer import _own_peak_rss; print(_own_peak_rss())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    child = int(out.stdout.strip().splitlines()[-1])
    assert 0 < child < bench._own_peak_rss()
