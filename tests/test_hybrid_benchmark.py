"""Smoke run of benchmarks/hybrid.py --quick: the records its issue names, its plot, and
U-LiRA of every hybrid variant (4 shadow runs in process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_hybrid_benchmark_quick_writes_its_records_and_plot(tmp_path):
    out = tmp_path / "hybrid"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "hybrid.py"), "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    result = json.loads((out / "hybrid.json").read_text())
    assert (out / "hybrid.png").stat().st_size > 0
    records = result["records"]
    streams = result["params"]["streams"]
    for r in records:
        assert {"requests", "strategy", "unlearn_s", "accuracy", "mia"} <= set(r)
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["mia"] <= 1.0
    got = {(r["requests"], r["variant"]) for r in records}
    variants = {r["variant"] for r in records}
    assert {"sisa", "hs", "retrained"} <= variants
    assert got == {(n, v) for n in streams for v in variants}  # one record per pair
    # the streams are prefixes of one stream: time only grows with the requests
    for v in variants - {"retrained"}:
        times = [
            r["unlearn_s"]
            for r in sorted(records, key=lambda r: r["requests"])
            if r["variant"] == v
        ]
        assert times == sorted(times) and times[0] > 0
    # what the hybrid strategies decided is counted per request
    hs = next(r for r in records if r["variant"] == "hs" and r["requests"] == max(streams))
    assert sum(hs["decisions"].values()) == max(streams)
    assert result["targets"]["requests"] == max(streams)
    assert "speedup_vs_sisa" in result["targets"]["hs"]
    assert (out / "_work").exists() is False  # its working copies are gone
    # fresh data: the generator's seed follows the evaluation seed (0 here)
    assert "data.synthetic.seed=0" in result["config_overrides"]
    # U-LiRA of every approximate variant, on the forget rows, against a retrained null
    u = result["ulira"]
    assert u["shadows"] == result["params"]["shadows"] >= 4
    assert set(u["variants"]) == variants - {"sisa", "retrained"}
    assert u["sisa_equals_retrained"] is True  # exact unlearning scores as the retrain does
    for fig in u["variants"].values():
        assert fig["negatives"] == fig["positives"] == u["forget_rows"] > 0
        for f in (fig, fig["null"]):
            assert 0.0 <= f["auc"] <= 1.0 and 0.0 <= f["tpr_at_1pct_fpr"] <= 1.0
    assert "ulira_gap_points" in result["targets"]["hs"]
