"""benchmarks/unlearning_speed.py's own arithmetic, without running it (the run needs a Ray
head and minutes): a request's fixed cost split into parts that add up to it."""

from __future__ import annotations

import math

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("unlearning_speed")


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
