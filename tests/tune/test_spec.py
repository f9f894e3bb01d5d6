"""Sweep files and the Pareto front: no Ray."""

from __future__ import annotations

import os

import pytest
import yaml

from ray_unlearn.platform.core.config import ConfigError, load_config
from ray_unlearn.tune.pareto import choose, dominates, pareto_front
from ray_unlearn.tune.spec import grid_points, load_sweep, num_trials, trial_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def _write(tmp_path, tree) -> str:
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump({"base_config": os.path.abspath(f"{CONFIGS}/digits.yaml"), **tree}))
    return str(p)


@pytest.mark.parametrize("name", ["sweep.yaml", "sweep_s3t.yaml", "sweep_hybrid.yaml"])
def test_shipped_sweeps_load(name):
    spec = load_sweep(os.path.join(CONFIGS, name))
    assert num_trials(spec) == len(grid_points(spec)) >= 4


def test_overrides_reach_the_sweep_the_space_and_every_trial(tmp_path):
    spec = load_sweep(
        os.path.join(CONFIGS, "sweep.yaml"),
        ["stream.deletions=2", "space.partition.shards=[3]", "training.epochs=1"],
    )
    assert spec.stream.deletions == 2 and spec.search.space["partition.shards"] == [3]
    cfg = trial_config(spec, grid_points(spec)[0])
    assert cfg.training.epochs == 1 and cfg.partition.shards == 3


def test_every_problem_is_reported_before_any_trial(tmp_path):
    path = _write(
        tmp_path,
        {
            "search": {
                "space": {
                    "partition.shards": [0, 2],
                    "partition.nonsense": [1],
                    "serving.policy": ["no-such-preset"],
                }
            },
            "stream": {"deletions": 0},
        },
    )
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert "stream.deletions" in str(err.value)
    path = _write(
        tmp_path,
        {"search": {"space": {"serving.policy": ["no-such-preset"], "seed": [0, -1]}}},
    )
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert "no-such-preset" in str(err.value) and "seed" in str(err.value)
    path = _write(
        tmp_path, {"search": {"space": {"partition.shards": [0], "partition.bogus": [1]}}}
    )
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert "partition.shards" in str(err.value) and "bogus" in str(err.value)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_sweep(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(tmp_path / "bad.yaml")


def test_trial_config_round_trips_through_train_yaml(tmp_path):
    from ray_unlearn.platform.core.config import config_to_yaml

    spec = load_sweep(os.path.join(CONFIGS, "sweep.yaml"))
    cfg = trial_config(spec, {"partition.shards": 8, "serving.policy": "lazy-exclude"})
    (tmp_path / "c.yaml").write_text(config_to_yaml(cfg))
    assert load_config(tmp_path / "c.yaml", []) == cfg


def _row(acc, cost, lat):
    return {"val_accuracy": acc, "unlearn_cpu_s": cost, "latency_mean_ms": lat}


def test_pareto_front_by_hand():
    rows = [
        _row(0.9, 1.0, 10.0),  # 0: front
        _row(0.8, 2.0, 20.0),  # 1: dominated by 0
        _row(0.95, 5.0, 10.0),  # 2: front (most accurate)
        _row(0.7, 0.5, 50.0),  # 3: front (cheapest)
        _row(0.9, 1.0, 10.0),  # 4: equal to 0: neither dominates
        {"val_accuracy": None, "unlearn_cpu_s": 1.0, "latency_mean_ms": 1.0},  # 5: incomplete
    ]
    assert dominates(rows[0], rows[1]) and not dominates(rows[0], rows[4])
    assert pareto_front(rows) == [0, 2, 3, 4]
    assert choose(rows, [0, 2, 3, 4], "val_accuracy", "max") == 2
    assert choose(rows, [0, 2, 3, 4], "unlearn_cpu_s", "min") == 3
    # other objectives: p99 latency instead of the mean reorders the front
    rows[3]["latency_p99_ms"], rows[0]["latency_p99_ms"] = 5.0, 60.0
    rows[2]["latency_p99_ms"] = rows[4]["latency_p99_ms"] = 60.0
    rows[1]["latency_p99_ms"] = 1.0
    p99 = {"val_accuracy": True, "unlearn_cpu_s": False, "latency_p99_ms": False}
    assert pareto_front(rows, p99) == [0, 1, 2, 3, 4]
    assert choose(rows, [0, 1, 2, 3, 4], "latency_p99_ms", "min", p99) == 1
    with pytest.raises(ValueError, match="nothing to choose"):
        choose(rows, [], "val_accuracy", "max")

    # test accuracy is a column beside the objectives, never one of them
    rows[0]["test_accuracy"] = 1.0
    assert pareto_front(rows) == [0, 2, 3, 4]


def test_selection_reads_validation_rows_only(tmp_path):
    spec = load_sweep(os.path.join(CONFIGS, "sweep.yaml"))
    assert spec.pareto.accuracy == "val_accuracy" and spec.select.metric == "val_accuracy"
    assert spec.stream.validation_fraction == 0.5
    for old in ("accuracy", "test_accuracy"):
        for key in ("pareto.accuracy", "select.metric"):
            with pytest.raises(ConfigError, match=f"{old!r} is no longer an objective.*val_acc"):
                load_sweep(os.path.join(CONFIGS, "sweep.yaml"), [f"{key}={old}"])
    # S3T's accuracy trigger reads its own validation rows: they must not be test rows here
    with pytest.raises(ConfigError, match="s3t.validation_fraction=0.6 exceeds stream"):
        load_sweep(os.path.join(CONFIGS, "sweep.yaml"), ["s3t.validation_fraction=0.6"])
    for bad in ("0", "1", "1.5"):
        with pytest.raises(ConfigError, match="stream.validation_fraction"):
            load_sweep(os.path.join(CONFIGS, "sweep.yaml"), [f"stream.validation_fraction={bad}"])


def test_variants_cross_the_shared_space_and_cover_every_dimension():
    spec = load_sweep(os.path.join(CONFIGS, "sweep.yaml"))
    points = grid_points(spec)
    assert num_trials(spec) == len(points) == 2 * 2 * (2 + 2 + 2)
    strategies = {p["unlearning.strategy"] for p in points}
    assert strategies == {"sisa", "hs", "s3t"}
    # a variant's keys appear only in its own trials
    assert all(("s3t.budget" in p) == (p["unlearning.strategy"] == "s3t") for p in points)
    assert all(("hybrid.threshold" in p) == (p["unlearning.strategy"] == "hs") for p in points)
    s3t = trial_config(spec, next(p for p in points if p["unlearning.strategy"] == "s3t"))
    assert s3t.model.hidden == [64, 64, 64] and s3t.partition.slices == 3 and s3t.s3t.budget == 1
    hs = trial_config(spec, next(p for p in points if p["unlearning.strategy"] == "hs"))
    assert hs.hybrid.record and hs.hybrid.threshold == 0.05
    # space.<key>= replaces a dimension where it lives; search.variants=[] drops the variants
    spec = load_sweep(os.path.join(CONFIGS, "sweep.yaml"), ["space.s3t.budget=[2]"])
    assert spec.search.variants[2]["s3t.budget"] == [2] and "s3t.budget" not in spec.search.space
    spec = load_sweep(
        os.path.join(CONFIGS, "sweep.yaml"), ["search.variants=[]", "space.partition.slices=[2]"]
    )
    assert num_trials(spec) == 4 and not spec.search.variants


def test_variant_and_selection_contradictions_are_reported_together(tmp_path):
    path = _write(
        tmp_path,
        {
            "search": {
                "space": {"partition.shards": [2]},
                "variants": [{"partition.shards": [4]}, {}],
            },
            "select": {"metric": "unlearn_cpu_s", "mode": "max"},
            "pareto": {"cost": "dollars"},
        },
    )
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    msg = str(err.value)
    assert "variants[0] repeats ['partition.shards']" in msg and "variants[1] is empty" in msg
    assert "select.mode='max' contradicts select.metric='unlearn_cpu_s'" in msg
    assert "pareto.cost" in msg and "unlearn_cpu_s" in msg  # names the allowed values


def test_s3t_trials_are_checked_against_their_model_before_the_sweep(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_sweep(
            os.path.join(CONFIGS, "sweep.yaml"),
            ["space.partition.slices=[2]", "space.s3t.budget=[7]"],
        )
    msg = str(err.value)
    assert "budget: B=7 exceeds the 2 distinct orders of R=2 slices" in msg
    assert "8 trials, e.g." not in msg and "4 trials, e.g." in msg  # each problem once
    spec = load_sweep(os.path.join(CONFIGS, "sweep.yaml"), ["select.metric=latency_p99_ms"])
    assert spec.select.mode == "min"  # the metric's own direction by default
