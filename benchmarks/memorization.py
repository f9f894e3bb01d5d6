"""Memorization proxies vs Feldman's exact estimator, and RUM with each score.

Run:  .venv/bin/python benchmarks/memorization.py --out results/memorization [--quick]

Data: scikit-learn's digits through a run (configs/digits.yaml: 1434 training / 363 test
rows); every model is the run's MLP (hidden [128]) trained with Adam (lr 2e-3, batch 64,
20 epochs). Per seed (3 full, 2 quick):

1. exact: Feldman's estimator with M subset models (keep 70%; full M=64, quick M=12) as
   parallel Ray tasks (2 CPUs; ``ray_unlearn.train.memorization``). cost_s = its wall time.
2. proxies: one model trained on every row, recording confidence, max-confidence, entropy
   and binary accuracy as running means over its epochs; cost_s = that training's wall
   time (the model one trains anyway: ``overhead_s`` is the recording's extra time over a
   plain training run). holdout_kl: fine-tune a copy on half the test rows for 3 epochs;
   cost_s = that fine-tuning plus the two forward passes.
3. spearman: rank correlation of each score (oriented: higher = more memorized) with the
   exact scores, on the training rows both define.
4. unlearning: a forget set of F random training rows (full 120, quick 60); the reference
   is a model retrained from scratch without it; the original is the proxy model of (2).
   RUM with each score (tertiles: low -> finetune, medium -> neggrad_plus, high -> salun; 3
   epochs each, lr 1e-3) and every plain algorithm on the whole forget set, each compared
   with the reference: ToW and ToW-MIA (``platform.rum.quality``; the MIA is the threshold
   attack of the hybrid evaluation, fitted on retain vs the other half of the test rows).

5. routing, on the platform: a digits run (4 shards x 3 slices) deletes the same owners
   (full 30, quick 6) one request at a time with ``sisa`` (exact), ``rum`` (approximate) and
   ``rum`` with ``route_quantile=0.67`` (requests whose samples rank in the top third of
   the shard's memorization, by the confidence proxy, retrained exactly): total unlearning
   seconds and ToW / ToW-MIA of the final ensemble against SISA's, which equals the ensemble
   retrained from scratch without those owners.

Output: <out>/memorization.json: ``records`` (one per score: score, cost_s, spearman, tow,
tow_mia as means over seeds, with ``*_std`` and per-seed lists), ``plain`` (one per plain
algorithm: tow, tow_mia), ``routing`` (one per strategy), ``targets``; <out>/memorization.png. Targets (reported, not
asserted): the best proxy >= 20x cheaper than the exact estimator, and RUM's ToW with it
within 0.02 of RUM with exact scores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from scipy.stats import spearmanr

from ray_unlearn.platform.approximate import ALGORITHMS, ApproxSettings, unlearn
from ray_unlearn.platform.config import load_config
from ray_unlearn.platform.memorization import (
    PROXIES,
    FitSpec,
    as_memorization,
    fit,
    holdout_kl,
    save_scores,
    train_with_proxies,
)
from ray_unlearn.platform.rum import RumPlan, quality, rum_unlearn
from ray_unlearn.platform.run import create_run
from ray_unlearn.train.memorization import exact_memorization_ray

REPO = Path(__file__).resolve().parents[1]
FULL = {"seeds": 3, "models": 64, "forget": 120, "epochs": 20, "routing_deletions": 30}
QUICK = {"seeds": 2, "models": 12, "forget": 60, "epochs": 10, "routing_deletions": 6}
SCORES = ("exact", *PROXIES, "holdout_kl")


def _t(x, y):
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, np.int64))


def one_seed(p: dict, seed: int, workdir: str) -> dict:
    cfg = load_config(REPO / "configs/digits.yaml", [f"storage={workdir}", f"seed={seed}"])
    ctx = create_run(cfg)
    train, test = ctx.split_records("train"), ctx.split_records("test")
    x, y = np.ascontiguousarray(train.features), train.labels.astype(np.int64)
    spec = FitSpec(cfg.model, ctx.feature_shape, ctx.num_classes, epochs=p["epochs"])
    out: dict = {"cost_s": {}, "scores": {}}

    t0 = time.perf_counter()
    out["scores"]["exact"] = exact_memorization_ray(spec, x, y, models=p["models"], seed=seed)
    out["cost_s"]["exact"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fit(spec, *_t(x, y), seed)  # the same training without recording: the overhead's base
    plain_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, proxies = train_with_proxies(spec, x, y, seed)
    proxy_s = time.perf_counter() - t0
    out["overhead_s"] = proxy_s - plain_s
    for k, v in proxies.items():
        out["scores"][k], out["cost_s"][k] = v, proxy_s

    half = np.random.default_rng([seed, 3]).permutation(len(test.labels))
    hold, evaluate_rows = half[: len(half) // 2], half[len(half) // 2 :]
    t0 = time.perf_counter()
    out["scores"]["holdout_kl"] = holdout_kl(
        spec, model, x, test.features[hold], test.labels[hold], seed=seed
    )
    out["cost_s"]["holdout_kl"] = time.perf_counter() - t0
    for name, s in out["scores"].items():
        save_scores(ctx, name, train.sample_ids, s, out["cost_s"][name])

    ref = as_memorization("exact", out["scores"]["exact"])
    ok = ~np.isnan(ref)
    out["spearman"] = {
        k: float(spearmanr(as_memorization(k, v)[ok], ref[ok]).statistic)
        for k, v in out["scores"].items()
    }

    rng = np.random.default_rng([seed, 4])
    forget_idx = np.sort(rng.choice(len(y), size=p["forget"], replace=False))
    keep = np.setdiff1d(np.arange(len(y)), forget_idx)
    forget, retain = _t(x[forget_idx], y[forget_idx]), _t(x[keep], y[keep])
    test_t = _t(test.features[evaluate_rows], test.labels[evaluate_rows])
    reference = fit(spec, *retain, seed)  # retrained from scratch without the forget set
    settings = ApproxSettings(epochs=3, lr=1e-3, seed=seed)
    out["rum"] = {}
    for name, s in out["scores"].items():
        plan = RumPlan(score=name)
        m = rum_unlearn(model, forget, retain, s[forget_idx], plan, settings)
        out["rum"][name] = quality(m, reference, forget, retain, test_t, seed=seed)
    out["plain"] = {
        a: quality(
            unlearn(a, model, forget, retain, settings),
            reference,
            forget,
            retain,
            test_t,
            seed=seed,
        )  # fmt: skip
        for a in ALGORITHMS
    }
    out["original"] = quality(model, reference, forget, retain, test_t, seed=seed)
    return out


ROUTING = {  # strategy label -> run overrides
    "sisa (exact)": ["unlearning.strategy=sisa"],
    "rum (approximate)": ["unlearning.strategy=rum"],
    "rum routed (top third exact)": ["unlearning.strategy=rum", "rum.route_quantile=0.67"],
}


def routing(p: dict, seed: int, workdir: str) -> dict:
    """The platform end to end: the same owners deleted from the same 4-shard digits run
    with each strategy; quality against SISA's result, which *is* the ensemble retrained from
    scratch without them (exact), so SISA's ToW is 1 by construction."""
    from ray_unlearn.platform.mia import eval_sets, evaluate, serving_predictor
    from ray_unlearn.platform.shard import train_all_shards
    from ray_unlearn.platform.unlearning import LocalShards, UnlearningEngine
    from ray_unlearn.train.demo import pick_owners

    out, evals = {}, {}
    for label, overrides in ROUTING.items():
        cfg = load_config(
            REPO / "configs/digits.yaml",
            [f"storage={workdir}/{len(out)}", f"seed={seed}", "rum.epochs=2", *overrides],
        )
        ctx = create_run(cfg)
        train_all_shards(ctx)
        eng = UnlearningEngine(ctx, LocalShards(ctx))
        owners = pick_owners(ctx, p["routing_deletions"], seed=seed)
        t0 = time.perf_counter()
        decisions = []
        for o in owners:
            rec = eng.forget(owner_id=o)
            decisions += [i.get("decision") for i in rec.details.get("strategy_info", {}).values()]
        spent = time.perf_counter() - t0
        forget_ids = np.concatenate([ctx.plan.samples_of_owner(o) for o in owners])
        evals[label] = evaluate(serving_predictor(ctx), *eval_sets(ctx, forget_ids), seed=seed)
        out[label] = {"unlearn_s": spent, "exact_decisions": decisions.count("exact"),
                      "requests": len(owners)}  # fmt: skip
    ref = evals["sisa (exact)"]
    for label, e in evals.items():
        d = {
            s: abs(e[f"accuracy_{s}"] - ref[f"accuracy_{s}"]) for s in ("forget", "retain", "test")
        }
        d_mia = abs(e["mia_forget"] - ref["mia_forget"])
        out[label]["tow"] = (1 - d["forget"]) * (1 - d["retain"]) * (1 - d["test"])
        out[label]["tow_mia"] = (1 - d_mia) * (1 - d["retain"]) * (1 - d["test"])
        out[label]["accuracy_test"] = e["accuracy_test"]
    return out


def _stats(vals):
    a = np.asarray(vals, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/memorization"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    p = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t_start = time.perf_counter()
    try:
        runs = []
        for seed in range(p["seeds"]):
            with tempfile.TemporaryDirectory() as d:
                runs.append(one_seed(p, seed, d))
            with tempfile.TemporaryDirectory() as d:
                runs[-1]["routing"] = routing(p, seed, d)
            print(f"seed {seed} done in {time.perf_counter() - t_start:.0f} s", flush=True)
    finally:
        ray.shutdown()
    records = []
    for name in SCORES:
        rec = {"score": name}
        for key, get in (
            ("cost_s", lambda r, n=name: r["cost_s"][n]),
            ("spearman", lambda r, n=name: r["spearman"][n]),
            ("tow", lambda r, n=name: r["rum"][n]["tow"]),
            ("tow_mia", lambda r, n=name: r["rum"][n]["tow_mia"]),
        ):
            vals = [get(r) for r in runs]
            rec[key], rec[f"{key}_std"] = _stats(vals)
            rec[f"{key}_per_seed"] = vals
        records.append(rec)
    plain = []
    for a in [*ALGORITHMS, "original"]:
        get = (lambda r, a=a: r["plain"][a]) if a != "original" else (lambda r: r["original"])
        rec = {"algorithm": a}
        for key in ("tow", "tow_mia"):
            rec[key], rec[f"{key}_std"] = _stats([get(r)[key] for r in runs])
        plain.append(rec)
    route = []
    for label in ROUTING:
        rec = {"strategy": label}
        for key in ("unlearn_s", "tow", "tow_mia", "accuracy_test", "exact_decisions"):
            rec[key], rec[f"{key}_std"] = _stats([r["routing"][label][key] for r in runs])
        route.append(rec)
    by = {r["score"]: r for r in records}
    proxies = [r for r in records if r["score"] != "exact"]
    best = max(proxies, key=lambda r: r["spearman"])
    cheapest_ratio = by["exact"]["cost_s"] / best["cost_s"]
    targets = {
        "best_proxy": best["score"],
        "best_proxy_cost_ratio": cheapest_ratio,
        "best_proxy_20x_cheaper": cheapest_ratio >= 20,
        "tow_gap_to_exact": by["exact"]["tow"] - best["tow"],
        "tow_within_0.02": abs(by["exact"]["tow"] - best["tow"]) <= 0.02,
    }
    doc = {
        "benchmark": "memorization",
        "settings": {
            **p,
            "quick": args.quick,
            "command": " ".join([sys.executable, *sys.argv]),
            "cpu_count": os.cpu_count(),
        },  # fmt: skip
        "records": records,
        "plain": plain,
        "routing": route,
        "recording_overhead_s": _stats([r["overhead_s"] for r in runs]),
        "targets": targets,
        "seconds": time.perf_counter() - t_start,
    }
    (args.out / "memorization.json").write_text(json.dumps(doc, indent=2))
    plot(records, plain, args.out / "memorization.png")
    print(f"{'score':16} {'cost s':>8} {'spearman':>9} {'ToW':>14} {'ToW-MIA':>14}")
    for r in records:
        print(f"{r['score']:16} {r['cost_s']:8.2f} {r['spearman']:9.3f} "
              f"{r['tow']:.3f}+-{r['tow_std']:.3f}   {r['tow_mia']:.3f}+-{r['tow_mia_std']:.3f}")  # fmt: skip
    for r in plain:
        print(f"plain {r['algorithm']:12} ToW {r['tow']:.3f}+-{r['tow_std']:.3f}  "
              f"ToW-MIA {r['tow_mia']:.3f}+-{r['tow_mia_std']:.3f}")  # fmt: skip
    for r in route:
        print(f"routing {r['strategy']:30} unlearn {r['unlearn_s']:.2f} s  ToW {r['tow']:.3f}  "
              f"ToW-MIA {r['tow_mia']:.3f}  exact decisions {r['exact_decisions']:.1f}")  # fmt: skip
    print("targets:", targets)
    print(f"wrote {args.out / 'memorization.json'} in {doc['seconds']:.0f} s")


def plot(records, plain, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["score"] for r in records]
    a.bar(names, [r["cost_s"] for r in records], color="tab:gray")
    a.set_yscale("log")
    a.set_ylabel("seconds (log)")
    a.set_title("cost of each memorization score")
    a.tick_params(axis="x", rotation=30)
    labels = [f"RUM:{n}" for n in names] + [r["algorithm"] for r in plain]
    tow = [r["tow"] for r in records] + [r["tow"] for r in plain]
    err = [r["tow_std"] for r in records] + [r["tow_std"] for r in plain]
    tm = [r["tow_mia"] for r in records] + [r["tow_mia"] for r in plain]
    xs = np.arange(len(labels))
    b.bar(xs - 0.2, tow, 0.4, yerr=err, label="ToW")
    b.bar(xs + 0.2, tm, 0.4, label="ToW-MIA")
    b.set_xticks(xs, labels, rotation=60, ha="right", fontsize=8)
    b.set_ylim(min(tow + tm) - 0.05, 1.0)
    b.set_title("unlearning quality vs retrained model (mean, sd over seeds)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
