"""The cluster launcher files pass Ray's own schema, and install this project."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster.local.yaml"])
def test_cluster_file_is_a_valid_launcher_config(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / name).read_text())
    validate_config(prepare_config(raw))  # raises on a schema violation
    setup = " ".join(raw["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install -e ~/ray-unlearn" in setup
    assert raw["file_mounts"]["/home/ubuntu/ray-unlearn"] == "."
    broken = {**raw, "provider": {**raw["provider"], "type": 42}}
    with pytest.raises(Exception):  # noqa: B017 - the schema's own error type
        validate_config(prepare_config(broken))
