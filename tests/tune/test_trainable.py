"""A sweep trial's process trains under worker_env's OpenMP rule (tune/trainable.py): the
variables are set before torch is loaded there. Fresh interpreters stand in for the trial's
process (this one has long loaded torch); one real Tune trial checks what Ray gives it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from ray_unlearn.tune import trainable
from ray_unlearn.tune.spec import load_sweep, trial_config
from tests.conftest import imported_by

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
DIGITS = os.path.abspath(os.path.join(CONFIGS, "digits.yaml"))
SWEEP = {
    "name": "env",
    "base_config": DIGITS,
    "search": {"space": {"partition.shards": [2]}},
    "stream": {"deletions": 1},
}


@pytest.fixture
def sweep_file(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    return str(path), str(tmp_path / "store")


def test_the_trainables_module_and_its_thread_count_import_no_torch(sweep_file):
    """What Tune unpickles in the trial's process, and what runs before the environment is
    set, must not load torch (its OpenMP reads the variables when loaded)."""
    path, store = sweep_file
    code = (
        "from ray_unlearn.tune import trainable\n"
        "from ray_unlearn.tune.spec import load_sweep\n"
        f"spec = load_sweep({path!r}, ['storage={store}'])\n"
        "assert trainable.trial_threads(spec, {'partition.shards': 2}) > 0"
    )
    assert imported_by(code, ["torch", "numpy", "ray_unlearn.tune.trial"]) == []


@pytest.mark.parametrize("threads", [0, 3])
def test_the_trial_threads_are_what_its_run_pins(sweep_file, threads):
    from ray_unlearn.platform.core.run import _pin_threads

    path, store = sweep_file
    spec = load_sweep(path, [f"storage={store}", f"training.torch_threads={threads}"])
    params = {"partition.shards": 2}
    pinned = _pin_threads(trial_config(spec, params)).training.torch_threads
    assert trainable.trial_threads(spec, params) == pinned == (threads or min(4, os.cpu_count()))


# The real trainable in a fresh interpreter standing in for a Tune trial's process: Ray's
# OMP_NUM_THREADS=1 (a 1-CPU actor) in its environment, the trial code replaced by one that
# loads torch and tells what torch got. Prints that as JSON.
TRIAL_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, types

    seen = {}

    def run_trial(spec, params, workdir, report=None, export_dir=None):
        import torch  # the trial code's first torch import, as in tune/trial.py
        seen.update(threads=torch.get_num_threads(), env={
            k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")})

    fake = types.ModuleType("ray_unlearn.tune.trial")
    fake.run_trial = run_trial
    sys.modules["ray_unlearn.tune.trial"] = fake
    from ray_unlearn.tune import trainable
    from ray_unlearn.tune.spec import load_sweep

    spec = load_sweep(sys.argv[1], ["storage=" + sys.argv[2]])
    trainable.trainable({"training.torch_threads": 2}, spec.model_dump(mode="json"))
    print(json.dumps(seen))
    """
)


# torch uses at most one thread per core whatever OMP_NUM_THREADS says: 2 shows the rule
TWO_CORES = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores")


@TWO_CORES
@pytest.mark.parametrize(("user_policy", "policy"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_trainable_sets_the_rule_before_torch_loads(sweep_file, tmp_path, user_policy, policy):
    path, store = sweep_file
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = "1"  # what Ray gives a trial that reserves 1 CPU
    if user_policy:
        env["OMP_WAIT_POLICY"] = user_policy  # the user's choice wins
    p = subprocess.run(
        [sys.executable, "-c", TRIAL_SCRIPT, path, store],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    seen = json.loads(p.stdout.strip().splitlines()[-1])
    assert seen == {"threads": 2, "env": {"OMP_WAIT_POLICY": policy, "OMP_NUM_THREADS": "2"}}


def test_a_process_with_torch_loaded_is_left_alone(monkeypatch):
    """Too late to change what OpenMP read: the environment stays as it is."""
    assert "torch" in sys.modules  # this process (conftest) loaded it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert trainable.prepare_trial_process(3) is False
    assert os.environ["OMP_NUM_THREADS"] == "1" and "OMP_WAIT_POLICY" not in os.environ


@TWO_CORES
@pytest.mark.ray
def test_a_tune_trial_process_has_no_torch_before_the_trainable_runs(ray_session, tmp_path):
    """In a real Tune trial (1 CPU, as the sweep asks), nothing of Ray or Tune has loaded
    torch when the trainable starts, so prepare_trial_process takes effect there."""
    from ray import tune

    def probe(config):
        from ray import tune as t

        before = {"torch_loaded": "torch" in sys.modules, "omp": os.environ.get("OMP_NUM_THREADS")}
        prepared = trainable.prepare_trial_process(config["threads"])
        import torch

        t.report(
            {
                **before,
                "prepared": prepared,
                "torch_threads": torch.get_num_threads(),
                "policy": os.environ.get("OMP_WAIT_POLICY"),
            }
        )

    tuner = tune.Tuner(
        tune.with_resources(probe, {"cpu": 1}),
        param_space={"threads": 2},
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0),
    )
    (result,) = tuner.fit()
    assert result.error is None, result.error
    m = result.metrics
    assert m["torch_loaded"] is False and m["prepared"] is True
    assert m["omp"] == "1"  # what Ray set: the rule replaces it
    assert m["torch_threads"] == 2
    assert m["policy"] == (os.environ.get("OMP_WAIT_POLICY") or "PASSIVE")
