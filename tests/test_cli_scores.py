"""`ray-unlearn scores`: memorization scores of a run's training samples, from the command
line (a proxy score: one model trained in process, no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.methods.rum.memorization import as_memorization, load_scores
from tests.conftest import tiny_config

CLI = [sys.executable, "-m", "ray_unlearn.cli", "scores"]


def _scores(*args: str) -> tuple[int, dict, str]:
    p = subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"one JSON document expected:\n{p.stdout}\n{p.stderr[-2000:]}"
    return p.returncode, json.loads(lines[0]), p.stderr


def test_scores_computes_the_configured_proxy_once_then_reads_it(tmp_path):
    ctx = create_run(tiny_config(tmp_path, "rum.score=entropy"))
    store = ctx.storage.uri
    code, doc, err = _scores("--run", ctx.run_id, "--storage", store, "--top", "5")
    assert code == 0, err
    (s,) = doc["scores"]
    assert s["score"] == "entropy" and s["computed_now"] and s["samples"] > 0
    # checked from outside: the listed samples are the top of the stored file, by memorization
    ids, vals = load_scores(ctx, "entropy")
    memo = as_memorization("entropy", vals)
    top = [r["sample_id"] for r in s["most_memorized"]]
    assert len(top) == 5 and set(top) <= set(ids.tolist())
    assert [r["memorization"] for r in s["most_memorized"]] == sorted(memo, reverse=True)[:5]
    owners = dict(zip(ctx.records.sample_ids.tolist(), ctx.records.owner_ids.tolist(), strict=True))
    assert all(owners[r["sample_id"]] == r["owner_id"] for r in s["most_memorized"])
    # a second call reads what is stored (same values, nothing recomputed)
    code, again, _ = _scores("--run", ctx.run_id, "--storage", store, "--top", "5")
    assert code == 0 and not again["scores"][0]["computed_now"]
    assert again["scores"][0]["most_memorized"] == s["most_memorized"]
    assert np.isfinite(again["scores"][0]["mean_memorization"])


def test_scores_refuses_an_unknown_score_and_a_missing_run(tmp_path):
    ctx = create_run(tiny_config(tmp_path))
    code, doc, _ = _scores(
        "--run", ctx.run_id, "--storage", ctx.storage.uri, "--score", "confidnce"
    )
    assert code == 2 and "confidnce" in doc["error"] and "holdout_kl" in doc["error"]
    code, doc, _ = _scores("--run", "nope", "--storage", ctx.storage.uri)
    assert code == 2 and "no run 'nope'" in doc["error"]
