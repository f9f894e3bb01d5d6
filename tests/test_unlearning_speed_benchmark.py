"""benchmarks/unlearning_speed.py's own arithmetic, without running it (the run needs a Ray
head and minutes): a request's fixed cost split into parts that add up to it."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "unlearning_speed_bench", REPO / "benchmarks" / "unlearning_speed.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fixed_cost_parts_add_up_to_the_fixed_cost(bench):
    # a request of 1.00 s seen by the driver: executing -> done 0.95 s, of which 0.90 s to
    # the shard results, the shards' own 0.80 s (two shards), 0.70 s of it training
    done = {"seconds": 0.90, "train_seconds": 0.70, "shard_seconds": {"0": 0.5, "3": 0.3}}
    parts = bench.fixed_cost_parts(1.00, done, 0.95)
    assert parts == pytest.approx(
        {"shard": 0.10, "dispatch": 0.10, "publish": 0.05, "outside": 0.05}
    )
    assert math.isclose(sum(parts.values()), 1.00 - done["train_seconds"])
    # without the log's timestamps only the executor-side parts are known
    assert set(bench.fixed_cost_parts(1.00, done, None)) == {"shard", "dispatch"}
