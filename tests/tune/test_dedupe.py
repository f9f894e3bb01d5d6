"""Grid points that run the same trial are counted once (no Ray)."""

from __future__ import annotations

import os

import yaml

from ray_unlearn.tune.dedupe import effective_key, unique_points
from ray_unlearn.tune.spec import load_sweep
from ray_unlearn.tune.sweep import POINT, _param_space, planned_trials

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def _spec(tmp_path, space, **extra):
    doc = {
        "name": "d",
        "base_config": os.path.abspath(os.path.join(CONFIGS, "digits.yaml")),
        "overrides": ["hybrid.record=true"],
        "search": {"method": "grid", "space": space},
        **extra,
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_sweep(path, [f"storage={tmp_path / 'store'}"])


def test_sweep_hybrid_runs_sisa_once_and_says_which_points_it_skipped():
    spec = load_sweep(os.path.join(CONFIGS, "sweep_hybrid.yaml"), ["storage=/tmp/unused"])
    points, skipped = unique_points(spec)
    assert [(p["unlearning.strategy"], p["hybrid.threshold"]) for p in points] == [
        ("sisa", 0.0),
        ("hs", 0.0),
        ("hs", 0.05),
        ("hs", 0.3),
    ]
    total, lines = planned_trials(spec)
    assert total == 4 and len(lines) == 2
    assert (
        lines[0] == "strategy=sisa,threshold=0.05 runs as strategy=sisa,threshold=0.0 "
        "(same config and policy)"
    )
    space = _param_space(spec)
    assert list(space) == [POINT] and space[POINT]["grid_search"] == points


def test_what_a_run_reads_keeps_trials_apart(tmp_path):
    # hybrid.record is read on a SISA run too (it records while training): two trials
    record = _spec(tmp_path, {"unlearning.strategy": ["sisa"], "hybrid.record": [True, False]})
    assert len(unique_points(record)[0]) == 2
    # a different serving policy is a different trial; the threshold counts on HS only
    space = {"hybrid.threshold": [0.1, 0.2], "serving.policy": ["lazy-wait", "lazy-exclude"]}
    assert len(unique_points(_spec(tmp_path, space))[0]) == 2  # digits.yaml: sisa
    hs = _spec(tmp_path, {**space, "unlearning.strategy": ["hs"]})
    assert len(unique_points(hs)[0]) == 4
    a, b = unique_points(hs)[0][:2]
    assert effective_key(hs, a) != effective_key(hs, b)
