"""`ray-unlearn sweep` refuses bad input with exit code 2 and one message naming every
problem, before Ray, MLflow or the sweep directory are touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _sweep(*args: str, cwd: Path) -> tuple[int, dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    p = subprocess.run(
        [sys.executable, "-m", "ray_unlearn.cli", "sweep", *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stdout + p.stderr[-2000:]
    return p.returncode, json.loads(lines[0]), p.stderr


def test_every_problem_of_a_sweep_in_one_message(tmp_path):
    code, doc, stderr = _sweep(
        "--config",
        str(REPO / "configs/sweep.yaml"),
        f"storage={tmp_path}",
        "stream.bogus=1",
        "search.method=bayes",
        "pareto.latency=p50",
        cwd=tmp_path,
    )
    assert code == 2 and "Traceback" not in stderr
    msg = doc["error"]
    assert "3 problem(s)" in msg
    assert "search.method" in msg and "'grid' or 'random'" in msg
    assert "stream.bogus" in msg
    assert "pareto.latency" in msg and "latency_p99_ms" in msg
    assert not any(tmp_path.iterdir())


def test_object_storage_without_a_tracking_server_is_refused_before_ray_starts(tmp_path):
    code, doc, _ = _sweep(
        "--config", str(REPO / "configs/sweep.yaml"), "storage=mock://bucket/unlearn", cwd=tmp_path
    )
    assert code == 2 and "MLFLOW_TRACKING_URI" in doc["error"]
    assert "mlflow.tracking_uri" in doc["error"]
    assert not any(tmp_path.iterdir())  # no ./sweeps, no Ray session directory


def test_missing_sweep_file(tmp_path):
    code, doc, _ = _sweep("--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert code == 2 and "nope.yaml" in doc["error"] and "not found" in doc["error"]


def test_the_header_counts_the_trials_that_run(tmp_path, monkeypatch):
    """sweep_hybrid.yaml crosses sisa with three thresholds: 6 grid points, 4 trials (SISA
    reads no threshold). The header says 4, and how many points it skipped."""
    from typer.testing import CliRunner

    from ray_unlearn import api
    from ray_unlearn.cli import app

    def stop(spec, address=None):  # the header is printed before the sweep starts
        raise ValueError("stop here")

    monkeypatch.setattr(api, "sweep", stop)
    res = CliRunner().invoke(
        app,
        ["sweep", "--config", str(REPO / "configs/sweep_hybrid.yaml"), "--storage", str(tmp_path)],
        env={"COLUMNS": "200"},
    )
    assert res.exit_code == 2, res.output
    assert "4 trial(s) (2 repeated grid point(s) skipped), 8 deletions each" in res.output


def test_storage_that_cannot_be_written_is_refused_before_ray_starts(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, doc, stderr = _sweep(
        "--config",
        str(REPO / "configs/sweep_hybrid.yaml"),
        "--storage",
        str(blocker / "root"),
        cwd=tmp_path,
    )
    assert code == 2 and "Not a directory" in doc["error"] and "a-file" in doc["error"]
    assert "Ray instance" not in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
