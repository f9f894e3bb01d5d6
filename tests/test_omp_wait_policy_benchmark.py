"""benchmarks/omp_wait_policy.py's worker, in a subprocess as the benchmark runs it, on a
tiny run: it times the stage it says and the digest is of the trained weights (two policies,
same threads: same digest; a different stage's training: a different one)."""

from __future__ import annotations

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("omp_wait_policy")


def test_worker_times_the_stage_and_digests_its_weights(bench, tmp_path):
    run_id = bench.make_run(tmp_path, n_samples=2000, epochs=1)
    passive = bench.run_one(tmp_path, run_id, "PASSIVE", 1, reps=2)
    spin = bench.run_one(tmp_path, run_id, "default", 1, reps=1)
    assert len(passive["walls_s"]) == 2 and passive["wall_s"] > 0 and passive["cpu_s"] > 0
    assert passive["torch_threads"] == 1
    # the policy changes when idle threads sleep, not the weights
    assert passive["weights_sha256"] == spin["weights_sha256"]
    # and the digest is of what was trained: another run's stage differs
    other = bench.make_run(tmp_path / "other", n_samples=2400, epochs=1)
    assert (
        bench.run_one(tmp_path / "other", other, "PASSIVE", 1, reps=1)["weights_sha256"]
        != passive["weights_sha256"]
    )
