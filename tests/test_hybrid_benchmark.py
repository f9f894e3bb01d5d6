"""Smoke run of benchmarks/hybrid.py --quick, shrunk to a toy size (1.6k rows, 2 shards x 2
slices, 4 epochs, 4 requests; ~25 s instead of ~2 min for --quick's own 4k rows, 4x4, 10
epochs, 10 requests): the records its issue names, its plot, and U-LiRA of every quick
variant (4 shadow runs in process). The code paths are --quick's: only the sizes differ."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# small enough that every quick variant still takes a DPUS and meets rows an earlier DPUS
# left untracked (the second request of a shard), in well under a minute
SMOKE = ["--rows", "1600", "--requests", "4", "--epochs", "4", "--shards", "2", "--slices", "2"]


def test_hybrid_benchmark_quick_writes_its_records_and_plot(tmp_path):
    out = tmp_path / "hybrid"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "hybrid.py"),
            "--quick",
            "--out",
            str(out),
            *SMOKE,
        ],
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
    assert result["params"]["n_samples"] == 1600 and streams == [1, 4]  # the sizes asked for
    last = {r["variant"]: r for r in records if r["requests"] == max(streams)}
    hs = last["hs"]
    assert sum(hs["decisions"].values()) == max(streams)
    for v in variants - {"retrained", "sisa"}:
        r = last[v]
        assert r["decisions"]["dpus"] > 0  # the approximate path ran, not only retrains
        # every exact request has its reason, and the wall time splits by decision
        assert sum(r["exact_reasons"].values()) == r["decisions"]["exact"]
        split = r["seconds_by_decision"]
        assert abs(split["exact"] + split["dpus"] - r["unlearn_s"]) < 1e-6
    # sisa predicts and decides nothing: every request is exact
    assert last["sisa"]["decisions"] == {"exact": max(streams), "dpus": 0}
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
