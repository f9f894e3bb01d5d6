"""Config loading: overrides, every problem reported at once, consistency checks."""

from __future__ import annotations

import pytest

from ray_unlearn.platform.core.config import (
    ConfigError,
    config_to_yaml,
    load_config,
    parse_overrides,
)


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(
        "configs/digits.yaml", ["partition.shards=8", "model.hidden=[64, 32]", "training.lr=0.01"]
    )
    assert cfg.partition.shards == 8 and cfg.model.hidden == [64, 32] and cfg.training.lr == 0.01
    assert cfg.data.source == "digits"
    p = tmp_path / "c.yaml"
    p.write_text(config_to_yaml(cfg))
    assert load_config(p) == cfg  # a stored config loads back unchanged


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(
            "configs/digits.yaml",
            ["partition.shards=0", "training.optimizer=rmsprop", "model.colour=red"],
        )
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "partition.shards" in msg and "training.optimizer" in msg and "'adam' or 'sgd'" in msg
    assert "model.colour" in msg


def test_contradictions_and_unknown_strategy():
    with pytest.raises(ConfigError, match="unknown strategy 'magic'; available: .*sisa"):
        load_config(None, ["unlearning.strategy=magic"])
    with pytest.raises(ConfigError, match="num_workers .5. exceeds partition.shards .2."):
        load_config(None, ["partition.shards=2", "training.num_workers=5"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_override_syntax():
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=x"]) == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["shards"])
