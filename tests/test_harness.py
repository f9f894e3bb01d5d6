"""The shared helpers of tests and benchmarks (ray_unlearn/harness.py) that need no Ray."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np

from ray_unlearn.harness import free_port, pick_owners, processes_of
from ray_unlearn.platform.core.config import load_config
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.methods.s3t.runtime import public_sample_ids
from tests.conftest import CONFIGS, tiny_config


def test_free_port_can_be_bound_on_localhost():
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_pick_owners_is_a_seeded_draw_of_owners_with_training_rows(tmp_path):
    ctx = create_run(tiny_config(tmp_path))  # no training needed: the plan decides
    owners = pick_owners(ctx, 20, seed=4)
    assert len(owners) == len(set(owners)) == 20
    trained = set(ctx.plan.owner_ids[ctx.plan.shards != TEST].tolist())
    assert set(owners) <= trained
    assert pick_owners(ctx, 20, seed=4) == owners != pick_owners(ctx, 20, seed=5)
    # the draw the benchmarks recorded their figures with (they had it inline): unchanged
    rng = np.random.default_rng(4)
    assert owners == [str(o) for o in rng.choice(sorted(trained), size=20, replace=False)]
    assert len(pick_owners(ctx, 10**6, seed=0)) == len(trained)  # capped at all of them


def test_pick_owners_leaves_out_owners_of_s3t_public_rows(tmp_path):
    cfg = load_config(os.path.join(CONFIGS, "digits_s3t.yaml"), [f"storage={tmp_path}"])
    ctx = create_run(cfg)
    public = set(public_sample_ids(ctx).tolist())
    assert public  # the config declares a public part
    owners = pick_owners(ctx, 10**6, seed=0)
    for owner in owners:
        assert not set(ctx.plan.samples_of_owner(owner).tolist()) & public
    trained = set(ctx.plan.owner_ids[ctx.plan.shards != TEST].tolist())
    public_owners = {o for o in trained if set(ctx.plan.samples_of_owner(o).tolist()) & public}
    assert public_owners and set(owners) == trained - public_owners


def test_processes_of_finds_only_processes_naming_the_directory(tmp_path):
    session = str(tmp_path / "session")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", session])
    try:
        # until the child has exec'd, /proc shows the parent's command line: wait for it
        deadline = time.monotonic() + 30
        while not processes_of(session) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_of(session) == [proc.pid]
        assert processes_of(str(tmp_path / "other")) == []
    finally:
        proc.kill()
        proc.wait()
    assert processes_of(session) == []
