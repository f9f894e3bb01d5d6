"""The cluster launcher files pass Ray's own schema as they are, and install this project."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster.local.yaml"])
def test_cluster_file_is_a_valid_launcher_config(name):
    raw = yaml.safe_load((REPO / name).read_text())
    # The raw file, with no preprocessing: `ray up` strips some keys before validating, a
    # stricter tool (or a later Ray) does not.
    jsonschema.validate(raw, _schema())
    setup = " ".join(raw["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install -e ~/ray-unlearn" in setup
    assert raw["file_mounts"]["/home/ubuntu/ray-unlearn"] == "."
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard`'s SSH tunnel
    assert "0.0.0.0" not in head
    broken = {**raw, "provider": {**raw["provider"], "type": 42}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**raw, "min_workers_typo": 1}, _schema())
