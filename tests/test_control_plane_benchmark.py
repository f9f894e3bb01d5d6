"""Smoke run of benchmarks/control_plane.py at tiny sizes: its figures, its own checks (the
gateway's view and the cold reader agree with what was logged; the audit finds a planted
violation) and its plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_control_plane_benchmark_small_sizes(tmp_path):
    out = tmp_path / "cp"
    cmd = [sys.executable, str(REPO / "benchmarks" / "control_plane.py"), "--out", str(out)]
    cmd += ["--quick", "--requests", "50", "--samples", "20000", "--work", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    doc = json.loads((out / "control_plane.json").read_text())
    assert (out / "control_plane.png").stat().st_size > 0
    assert set(doc["log"]) == {"local:50", "mem:50"}
    for row in doc["log"].values():
        assert row["requests"] == 50
        for key in ("per_request_ms", "gateway_poll_ms"):
            assert 0 < row[key]["median"] <= row[key]["p90"] <= row[key]["max"]
        assert row["cold_reader_s"] > 0 and row["snapshot_s"] > 0
    audit = doc["audit"]["20000"]
    assert audit["samples"] == 20000 and audit["audit_ms"]["median"] > 0
