"""Smoke run of benchmarks/rum_mnist1d.py at its ``--tiny`` size, in process and without Ray
(``--local``): every part's JSON has its keys and sane values, and the report chooses the
best plain algorithm and proxy on the tuning seed, not on the reported one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ray_unlearn.platform.methods.approximate import ALGORITHMS
from ray_unlearn.platform.methods.rum.memorization import SCORES
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("rum_mnist1d")


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("rum")

    def part(*args: str) -> None:
        bench.main([*args, "--tiny", "--local", "--out", str(out)])

    for seed in ("0", "1"):  # 0 tunes, 1 is reported
        part("exact", "--seed", seed)
        part("eval", "--seed", seed)
    part("ulira", "--seed", "1")
    part("report", "--seeds", "1", "--tune-seed", "0")
    return out


def _read(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def _unit(v: float) -> bool:
    return 0.0 <= v <= 1.0


def test_exact_grows_models_and_records_split_half(run, bench):
    ex = _read(run, "exact_seed1.json")
    assert ex["models"] == bench.TINY["max_models"] == len(np.load(run / "exact_seed1.npz")["cpu"])
    assert ex["cpu_s"] > 0 and ex["curve"] and -1.0 <= ex["curve"][-1]["mean"] <= 1.0


def test_eval_scores_and_forget_sets(run, bench):
    ev = _read(run, "eval_seed1.json")
    assert ev["rows"]["train"] + ev["rows"]["test"] == bench.TINY["n_samples"]
    assert set(ev["scores"]) == set(SCORES)
    assert ev["scores"]["exact"]["spearman"] == pytest.approx(1.0)
    # the model fits its training rows better than the test rows: there is memorization
    assert ev["accuracy"]["train"] > ev["accuracy"]["test"] + 0.2
    for s in ev["scores"].values():
        assert -1.0 <= s["spearman"] <= 1.0 and _unit(s["top10_overlap"]) and s["cpu_s"] > 0
    methods = {"original", *(f"rum:{k}" for k in SCORES), *ALGORITHMS}
    for kind in bench.KINDS:
        r = ev["forget"][kind]
        assert methods <= set(r)
        for m in methods:
            assert _unit(r[m]["tow"]) and _unit(r[m]["tow_mia"])
            assert _unit(r[m]["model_accuracy_forget"])
        reps = ev["repeats"][kind]
        assert set(reps) == {f"rum:{k}" for k in bench.REPEATED}
        for k, tows in reps.items():  # the first run is the table's own
            assert len(tows) == 1 + bench.TINY["rum_repeats"] and tows[0] == r[k]["tow"]
    # the "high" forget set holds the rows the estimator scores highest
    fr = ev["forget"]
    assert fr["high"]["exact_mean_memorization"] >= fr["random"]["exact_mean_memorization"]


def test_ulira_scores_every_rum_score_and_algorithm(run, bench):
    ul = _read(run, "ulira_seed1.json")
    for kind in bench.KINDS:
        methods = ul[kind]["methods"]
        assert set(methods) == {"original", *(f"rum:{k}" for k in SCORES), *ALGORITHMS}
        for v in methods.values():
            assert _unit(v["auc"]) and _unit(v["tpr_at_1pct_fpr"]) and _unit(v["tpr_at_0.1pct_fpr"])


def test_report_chooses_on_the_tuning_seed(run, bench):
    doc, tune = _read(run, "rum_mnist1d.json"), _read(run, "eval_seed0.json")
    t = doc["targets"]
    assert doc["seeds"] == [1] and doc["tune_seed"] == 0 and t["chosen_on"] == "tuning seed 0"
    proxies = [k for k in SCORES if k != "exact"]
    assert t["best_proxy"] == max(proxies, key=lambda k: tune["scores"][k]["spearman"])
    for kind in bench.KINDS:
        plain = max(ALGORITHMS, key=lambda a: tune["forget"][kind][a]["tow"])
        assert t[kind]["best_plain"] == plain
        if t["best_proxy"] in bench.REPEATED:  # the tiny run's choice may be another proxy
            assert "tow_gap_exact_minus_best_proxy" in t[kind]["repeats"]
        assert "ulira" in doc["forget"][kind][f"rum:{t['best_proxy']}"]
    assert "| rum:exact |" in (run / "rum_mnist1d.md").read_text()
    with pytest.raises(ValueError, match="tuning seed"):
        bench.report(run, [0, 1], tune_seed=0)


def test_report_can_take_its_choice_from_another_data_sets_tuning_seed(run, bench, tmp_path):
    # bbcnews takes MNIST-1D's choices: the tuning seed's eval lives in another --out
    (tmp_path / "eval_seed0.json").write_text((run / "eval_seed0.json").read_text())
    doc = bench.report(run, [1], tune_seed=0, tune_out=tmp_path)
    assert doc["targets"]["chosen_on"] == f"tuning seed 0 of {tmp_path}"
    assert doc["targets"] == {**bench.report(run, [1], tune_seed=0)["targets"],
                              "chosen_on": doc["targets"]["chosen_on"]}  # fmt: skip


def test_bbcnews_split_is_fresh_per_seed_and_disjoint(bench, tmp_path):
    # a stand-in for the MiniLM embeddings (computing them takes minutes)
    rng = np.random.default_rng(0)
    np.savez_compressed(tmp_path / "bbcnews_minilm.npz",
                        x=rng.normal(size=(400, 384)).astype(np.float32),
                        y=rng.integers(0, 5, 400))  # fmt: skip
    p = {**bench.TEXT_FULL, "data": "bbcnews", "n_samples": 300}
    x, y, tx, ty = bench.load(p, 1, tmp_path)
    assert x.shape[1] == tx.shape[1] == 384 and len(y) + len(ty) == 300
    assert 0.1 < len(ty) / 300 < 0.3
    assert not {r.tobytes() for r in x} & {r.tobytes() for r in tx}
    x2 = bench.load(p, 2, tmp_path)[0]
    assert x2.shape != x.shape or not np.array_equal(x2, x)
    assert bench.spec_of(p).feature_shape == (384,) and bench.spec_of(p).num_classes == 5


def test_repeat_summary_averages_runs_before_the_gap(bench):
    reps = [{"rum:exact": [0.90, 0.92], "rum:confidence": [0.88, 0.90]},
            {"rum:exact": [0.80, 0.80], "rum:confidence": [0.80, 0.80]}]  # fmt: skip
    got = bench.repeat_summary(reps, "confidence")
    assert got["runs_per_seed"] == 2
    assert got["tow_gap_exact_minus_best_proxy"]["per_seed"] == pytest.approx([0.02, 0.0])
    # run-to-run sd pooled over seeds: sqrt(mean(var([.90, .92]), 0)) = 0.01
    assert got["within_seed_sd"]["rum:exact"] == pytest.approx(0.01)
