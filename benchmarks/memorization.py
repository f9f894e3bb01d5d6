"""Memorization proxies vs Feldman's exact estimator, and RUM with each score.

Run:  .venv/bin/python benchmarks/memorization.py --out results/memorization [--quick]

Data: scikit-learn's digits through a run (configs/digits.yaml: 1434 training / 363 test
rows); every model is the run's MLP (hidden [128]) trained with Adam (lr 2e-3, batch 64,
20 epochs). Per seed (3 full, 2 quick):

1. exact: Feldman's estimator with M subset models (keep 70%; full M=64, quick M=12) as
   parallel Ray tasks (2 CPUs; ``ray_unlearn.train.memorization``). cost_s = its wall time.
2. proxies: one model trained on every row, recording confidence, max-confidence, entropy
   and binary accuracy as running means over its epochs; cost_s = that training's wall
   time, counted in full although it is the model one trains anyway (``marginal_s``: the
   recording's extra time over the same training without it). holdout_kl: fine-tune a copy
   on half the test rows for 3 epochs; cost_s = the plain training plus that fine-tuning
   and the two forward passes (``marginal_s``: the fine-tuning and passes alone).
3. spearman: rank correlation of each score (oriented: higher = more memorized) with the
   exact scores, on the training rows both define; top10_overlap: the share of the exact
   scores' top 10% that the score also ranks in its top 10% (chance: 0.1). On digits most
   rows are barely memorized and their exact scores are mostly estimator noise, which caps
   the Spearman correlation; the top decile is what RUM's high group and routing use.
4. unlearning: a forget set of F training rows (full 120, quick 60), of two kinds: ``mix``
   (as in the RUM paper: a third each from the low (below median), medium (to the 90th
   percentile) and high (top 10%) exact memorization levels; the records' ``tow`` and
   ``tow_mia``) and ``random`` (a uniform draw; ``tow_random``, ``tow_mia_random``). The
   reference is a model retrained from scratch without the forget set; the original is
   the proxy model of (2). RUM with each score (tertiles: low -> finetune, medium ->
   neggrad_plus, high -> salun; 3 epochs each, lr 1e-3) and every plain algorithm on the
   whole forget set, each compared with the reference: ToW and ToW-MIA
   (``platform.eval.tow.quality``; the MIA is the threshold attack of the hybrid evaluation,
   fitted on retain vs half of the evaluation rows, its member rate averaged over 10 fits
   because on digits the attack has little signal and a single fit's rate is noise).

5. routing, on the platform: a digits run (4 shards x 3 slices) deletes the same owners
   (full 30, quick 6) one request at a time with ``sisa`` (exact), ``rum`` (approximate),
   ``rum`` with ``route_quantile=0.67`` (requests whose samples rank in the top third of
   the shard's memorization, by the confidence proxy over the slice checkpoints, retrained
   exactly), and the control: ``rum.route_by=random`` at the same quantile (a third of the
   requests, picked by a coin). Per strategy: total unlearning seconds (wall and CPU of
   this process; everything runs in it on one torch thread), and ToW / ToW-MIA of the
   final ensemble against SISA's, which equals the ensemble retrained from scratch without
   those owners. Routing improves the time-vs-quality trade-off if the routed strategy is
   above the straight line from rum (approximate) to sisa (exact) at its CPU time
   (``*_above_line``: what mixing the two blindly in that proportion buys); memorization
   is what pays if it also gains more quality per extra second than the random control
   (``*_beats_control``).

Output: <out>/memorization.json: ``records`` (one per score: score, cost_s, spearman, tow,
tow_mia as means over seeds, with ``*_std``, ``*_ci95`` (Student-t over seeds) and
per-seed lists), ``plain`` (one per plain algorithm: tow, tow_mia), ``routing`` (one per
strategy, and the verdict), ``targets``; <out>/memorization.png. Targets (reported, not
asserted): the best proxy (highest Spearman) >= 20x cheaper than the exact estimator, and
RUM's ToW with it within 0.02 of RUM with exact scores.
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

from ray_unlearn.platform.core.config import load_config
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.eval.tow import quality, seed_interval, tow
from ray_unlearn.platform.methods.approximate import ALGORITHMS, ApproxSettings, unlearn
from ray_unlearn.platform.methods.rum.memorization import (
    PROXIES,
    FitSpec,
    as_memorization,
    fit,
    holdout_kl,
    save_scores,
    train_with_proxies,
)
from ray_unlearn.platform.methods.rum.unlearn import RumPlan, rum_unlearn
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
    out: dict = {"cost_s": {}, "marginal_s": {}, "scores": {}}

    t0 = time.perf_counter()
    out["scores"]["exact"] = exact_memorization_ray(spec, x, y, models=p["models"], seed=seed)
    out["cost_s"]["exact"] = out["marginal_s"]["exact"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fit(spec, *_t(x, y), seed)  # the same training without recording: the overhead's base
    plain_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, proxies = train_with_proxies(spec, x, y, seed)
    proxy_s = time.perf_counter() - t0
    for k, v in proxies.items():
        out["scores"][k], out["cost_s"][k] = v, proxy_s
        out["marginal_s"][k] = max(proxy_s - plain_s, 0.0)

    half = np.random.default_rng([seed, 3]).permutation(len(test.labels))
    hold, evaluate_rows = half[: len(half) // 2], half[len(half) // 2 :]
    t0 = time.perf_counter()
    out["scores"]["holdout_kl"] = holdout_kl(
        spec, model, x, test.features[hold], test.labels[hold], seed=seed
    )
    out["marginal_s"]["holdout_kl"] = time.perf_counter() - t0
    out["cost_s"]["holdout_kl"] = plain_s + out["marginal_s"]["holdout_kl"]
    for name, s in out["scores"].items():
        save_scores(ctx, name, train.sample_ids, s, out["cost_s"][name])

    ref = as_memorization("exact", out["scores"]["exact"])
    ok = ~np.isnan(ref)
    out["spearman"] = {
        k: float(spearmanr(as_memorization(k, v)[ok], ref[ok]).statistic)
        for k, v in out["scores"].items()
    }
    out["top10_overlap"] = {
        k: top_overlap(as_memorization(k, v)[ok], ref[ok]) for k, v in out["scores"].items()
    }

    test_t = _t(test.features[evaluate_rows], test.labels[evaluate_rows])
    settings = ApproxSettings(epochs=3, lr=1e-3, seed=seed)
    out["rum"], out["plain"], out["original"] = {}, {}, {}
    for kind in FORGET_SETS:
        forget_idx = forget_rows(kind, out["scores"]["exact"], p["forget"], seed)
        keep = np.setdiff1d(np.arange(len(y)), forget_idx)
        forget, retain = _t(x[forget_idx], y[forget_idx]), _t(x[keep], y[keep])
        reference = fit(spec, *retain, seed)  # retrained from scratch without the forget set

        def measure(m, forget=forget, retain=retain, reference=reference):
            return quality(m, reference, forget, retain, test_t, seed=seed)

        out["rum"][kind] = {
            name: measure(
                rum_unlearn(model, forget, retain, s[forget_idx], RumPlan(name), settings)
            )
            for name, s in out["scores"].items()
        }
        out["plain"][kind] = {
            a: measure(unlearn(a, model, forget, retain, settings)) for a in ALGORITHMS
        }
        out["original"][kind] = measure(model)
    return out


def top_overlap(score: np.ndarray, exact: np.ndarray, share: float = 0.1) -> float:
    """Share of the exact estimator's top ``share`` rows that ``score`` also ranks there
    (what the high group and routing need; chance level = ``share``)."""
    k = max(1, int(round(share * len(exact))))
    top = set(np.argsort(-exact, kind="stable")[:k].tolist())
    return len(top & set(np.argsort(-score, kind="stable")[:k].tolist())) / k


FORGET_SETS = ("mix", "random")


def forget_rows(kind: str, exact: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Training rows to forget. ``random``: a uniform draw. ``mix`` (as in the RUM paper): a
    third from each memorization level of the exact scores: low (below the median), medium
    (median to 90th percentile) and high (top 10%), so the forget set holds samples a model
    did memorize, where the unlearning algorithms differ."""
    rng = np.random.default_rng([seed, 4])
    if kind == "random":
        return np.sort(rng.choice(len(exact), size=size, replace=False))
    if kind != "mix":
        raise ValueError(f"unknown forget set {kind!r}; known: {', '.join(FORGET_SETS)}")
    mem = np.where(np.isnan(exact), -np.inf, exact)  # no estimate: not picked as memorized
    order = np.argsort(mem, kind="stable")
    n = len(order)
    levels = (order[: n // 2], order[n // 2 : int(n * 0.9)], order[int(n * 0.9) :])
    counts = [len(a) for a in np.array_split(np.arange(size), 3)]
    if any(c > len(lv) for c, lv in zip(counts, levels, strict=True)):
        raise ValueError(f"forget size {size}: a third exceeds the top 10% ({len(levels[2])} rows)")
    picked = [rng.choice(lv, size=c, replace=False) for c, lv in zip(counts, levels, strict=True)]
    return np.sort(np.concatenate(picked))


ROUTING = {  # strategy label -> run overrides
    "sisa (exact)": ["unlearning.strategy=sisa"],
    "rum (approximate)": ["unlearning.strategy=rum"],
    "rum routed (top third exact)": ["unlearning.strategy=rum", "rum.route_quantile=0.67"],
    "rum random-routed (control)": [
        "unlearning.strategy=rum",
        "rum.route_quantile=0.67",
        "rum.route_by=random",
    ],
}
EXACT, APPROX, ROUTED, CONTROL = ROUTING


def routing(p: dict, seed: int, workdir: str) -> dict:
    """The platform end to end: the same owners deleted from the same 4-shard digits run
    with each strategy; quality against SISA's result, which *is* the ensemble retrained from
    scratch without them (exact), so SISA's ToW is 1 by construction."""
    from ray_unlearn.harness import pick_owners
    from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
    from ray_unlearn.platform.core.runtime import train_all_shards
    from ray_unlearn.platform.eval.mia import eval_sets, serving_predictor

    out, evals = {}, {}
    for label, overrides in ROUTING.items():
        cfg = load_config(
            REPO / "configs/digits.yaml",
            [
                f"storage={workdir}/{len(out)}",
                f"seed={seed}",
                "rum.epochs=2",
                "training.torch_threads=1",
                *overrides,
            ],  # fmt: skip
        )
        ctx = create_run(cfg)
        train_all_shards(ctx)
        eng = UnlearningEngine(ctx, LocalShards(ctx))
        owners = pick_owners(ctx, p["routing_deletions"], seed=seed)
        t0, c0 = time.perf_counter(), time.process_time()
        decisions, first_exact = [], []
        for o in owners:
            rec = eng.forget(owner_id=o)
            for i in rec.details.get("strategy_info", {}).values():
                decisions.append(i.get("decision"))
                if i.get("decision") == "exact":
                    first_exact.append(i.get("first_slice", 0))
        spent, cpu = time.perf_counter() - t0, time.process_time() - c0
        forget_ids = np.concatenate([ctx.plan.samples_of_owner(o) for o in owners])
        evals[label] = ensemble_quality(serving_predictor(ctx), eval_sets(ctx, forget_ids), seed)
        out[label] = {"unlearn_s": spent, "unlearn_cpu_s": cpu, "requests": len(owners),
                      "exact_decisions": decisions.count("exact"),
                      # first affected slice of the exact retrains (earlier = dearer)
                      "exact_first_slice": float(np.mean(first_exact)) if first_exact
                      else None}  # fmt: skip
    ref = evals["sisa (exact)"]
    for label, e in evals.items():
        d = {
            s: abs(e[f"accuracy_{s}"] - ref[f"accuracy_{s}"]) for s in ("forget", "retain", "test")
        }
        d_mia = abs(e["mia_forget"] - ref["mia_forget"])
        out[label]["tow"] = tow(d["forget"], d["retain"], d["test"])
        out[label]["tow_mia"] = tow(d_mia, d["retain"], d["test"])
        out[label]["accuracy_test"] = e["accuracy_test"]
    return out


def ensemble_quality(predict, sets, seed: int, repeats: int = 10) -> dict[str, float]:
    """Accuracy on (retain, forget, test) and the forget set's MIA member rate, averaged over
    ``repeats`` attack fits as in ``platform.eval.tow.quality``."""
    from ray_unlearn.platform.eval.mia import membership_inference

    out, got = {}, {}
    for es in sets:
        labels, probs = predict(es.features)
        out[f"accuracy_{es.name}"] = float((labels == es.labels).mean())
        got[es.name] = (probs, es.labels)
    fits = [
        membership_inference(got["retain"], got["test"], got["forget"], seed=seed * 1000 + i)
        for i in range(repeats)
    ]
    out["mia_forget"] = float(np.mean([f["mia_forget"] for f in fits]))
    return out


def routing_verdict(route: dict[str, dict], time_key: str = "unlearn_cpu_s") -> dict:
    """Does memorization-aware routing buy more quality per second than mixing blindly?

    Per quality measure (ToW, ToW-MIA): the quality each strategy gains over plain rum per
    extra second of unlearning (CPU seconds by default: the machine is shared, and its
    wall seconds grow with other jobs). Going fully exact (sisa) gains at the slope of the
    straight line from rum to sisa; routing improves the trade-off when it gains faster
    (``above_line`` > 0: above that line at its own time), and memorization is what pays
    when it also gains faster than the random control."""
    ex, ap, ro, co = (route[k] for k in (EXACT, APPROX, ROUTED, CONTROL))

    def gain_per_s(r, key):
        dt = r[time_key] - ap[time_key]
        return (r[key] - ap[key]) / dt if dt > 0 else float("nan")

    out: dict = {"time": time_key}
    span = ex[time_key] - ap[time_key]
    out["routed_time_share"] = (ro[time_key] - ap[time_key]) / span if span > 0 else float("nan")
    for key in ("tow", "tow_mia"):
        line = ap[key] + out["routed_time_share"] * (ex[key] - ap[key])
        out[f"{key}_above_line"] = ro[key] - line
        for name, r in (("exact", ex), ("routed", ro), ("control", co)):
            out[f"{key}_gain_per_s_{name}"] = gain_per_s(r, key)
        out[f"{key}_improves_tradeoff"] = bool(out[f"{key}_above_line"] > 0)
        out[f"{key}_beats_control"] = bool(
            out[f"{key}_gain_per_s_routed"] > out[f"{key}_gain_per_s_control"]
        )
    return out


def _stats(vals):
    i = seed_interval(vals)
    return i["mean"], i["sd"]


def _put(rec: dict, key: str, vals) -> None:
    """Mean, sd, Student-t 95% interval and the per-seed values of ``key``."""
    i = seed_interval(vals)
    rec[key], rec[f"{key}_std"] = i["mean"], i["sd"]
    rec[f"{key}_ci95"] = [i["ci95_low"], i["ci95_high"]]
    rec[f"{key}_per_seed"] = [float(v) for v in vals]


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
            ("marginal_s", lambda r, n=name: r["marginal_s"][n]),
            ("spearman", lambda r, n=name: r["spearman"][n]),
            ("top10_overlap", lambda r, n=name: r["top10_overlap"][n]),
        ):
            _put(rec, key, [get(r) for r in runs])
        for kind in FORGET_SETS:  # the primary forget set ("mix") unsuffixed
            sfx = "" if kind == FORGET_SETS[0] else f"_{kind}"
            for key in ("tow", "tow_mia"):
                _put(rec, key + sfx, [r["rum"][kind][name][key] for r in runs])
        records.append(rec)
    plain = []
    for a in [*ALGORITHMS, "original"]:
        rec = {"algorithm": a}
        for kind in FORGET_SETS:
            sfx = "" if kind == FORGET_SETS[0] else f"_{kind}"
            for key in ("tow", "tow_mia"):
                vals = [(r["original"][kind] if a == "original" else r["plain"][kind][a])[key]
                        for r in runs]  # fmt: skip
                _put(rec, key + sfx, vals)
        plain.append(rec)
    route = []
    for label in ROUTING:
        rec = {"strategy": label}
        for key in ("unlearn_s", "unlearn_cpu_s", "tow", "tow_mia", "accuracy_test",
                    "exact_decisions"):  # fmt: skip
            _put(rec, key, [r["routing"][label][key] for r in runs])
        firsts = [r["routing"][label]["exact_first_slice"] for r in runs]
        rec["exact_first_slice_per_seed"] = firsts
        known = [f for f in firsts if f is not None]
        rec["exact_first_slice"] = float(np.mean(known)) if known else None
        route.append(rec)
    verdict = routing_verdict({r["strategy"]: r for r in route})
    verdict["per_seed"] = [routing_verdict(r["routing"]) for r in runs]
    by = {r["score"]: r for r in records}
    proxies = [r for r in records if r["score"] != "exact"]
    best = max(proxies, key=lambda r: r["spearman"])
    cheapest_ratio = by["exact"]["cost_s"] / best["cost_s"]
    # paired over seeds: RUM with exact scores minus RUM with the best proxy, same seed
    gap = seed_interval(np.subtract(by["exact"]["tow_per_seed"], best["tow_per_seed"]).tolist())
    targets = {
        "best_proxy": best["score"],
        "best_proxy_by": "highest mean Spearman correlation with the exact scores",
        "best_proxy_cost_ratio": cheapest_ratio,
        "best_proxy_20x_cheaper": cheapest_ratio >= 20,
        "tow_gap_to_exact": gap["mean"],
        "tow_gap_to_exact_ci95": [gap["ci95_low"], gap["ci95_high"]],
        "tow_within_0.02": abs(gap["mean"]) <= 0.02,
        "every_proxy": {
            r["score"]: {
                "cost_ratio": by["exact"]["cost_s"] / r["cost_s"],
                "tow_gap_to_exact": by["exact"]["tow"] - r["tow"],
            }
            for r in proxies
        },
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
        "routing_verdict": verdict,
        "targets": targets,
        "seconds": time.perf_counter() - t_start,
    }
    (args.out / "memorization.json").write_text(json.dumps(doc, indent=2))
    plot(records, plain, route, args.out / "memorization.png")
    print("forget set: mix (random in brackets); mean+-sd over seeds")
    print(f"{'score':16} {'cost s':>8} {'spearman':>9} {'top10':>6} {'ToW':>22} {'ToW-MIA':>22}")
    for r in records:
        print(f"{r['score']:16} {r['cost_s']:8.2f} {r['spearman']:9.3f} {r['top10_overlap']:6.3f} "
              f"{r['tow']:.3f}+-{r['tow_std']:.3f} ({r['tow_random']:.3f})  "
              f"{r['tow_mia']:.3f}+-{r['tow_mia_std']:.3f} ({r['tow_mia_random']:.3f})")  # fmt: skip
    for r in plain:
        print(f"plain {r['algorithm']:12} ToW {r['tow']:.3f}+-{r['tow_std']:.3f} "
              f"({r['tow_random']:.3f})  ToW-MIA {r['tow_mia']:.3f}+-{r['tow_mia_std']:.3f} "
              f"({r['tow_mia_random']:.3f})")  # fmt: skip
    for r in route:
        print(f"routing {r['strategy']:30} unlearn {r['unlearn_s']:.2f} s "
              f"(cpu {r['unlearn_cpu_s']:.2f} s)  ToW {r['tow']:.3f}  "
              f"ToW-MIA {r['tow_mia']:.3f}  exact decisions {r['exact_decisions']:.1f}")  # fmt: skip
    print("routing verdict:", {k: v for k, v in verdict.items() if k != "per_seed"})
    print("targets:", targets)
    print(f"wrote {args.out / 'memorization.json'} in {doc['seconds']:.0f} s")


def plot(records, plain, route, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 4.8), width_ratios=[1, 1.6, 1])
    names = [r["score"] for r in records]
    a.bar(names, [r["cost_s"] for r in records], color="tab:gray", label="cost_s")
    a.bar(names, [r["marginal_s"] for r in records], color="tab:blue", label="marginal_s")
    a.set_yscale("log")
    a.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.5, not 5x10^-1
    a.yaxis.set_minor_formatter(NullFormatter())
    a.set_ylabel("seconds (log)")
    a.set_title("cost of each memorization score")
    a.tick_params(axis="x", rotation=30)
    a.legend(fontsize=8)
    labels = [f"RUM:{n}" for n in names] + [r["algorithm"] for r in plain]
    rows = [*records, *plain]
    xs = np.arange(len(labels))
    for off, key in ((-0.2, "tow"), (0.2, "tow_mia")):
        mean = np.array([r[key] for r in rows])
        ci = np.array([r[f"{key}_ci95"] for r in rows])
        b.bar(xs + off, mean, 0.4, yerr=[mean - ci[:, 0], ci[:, 1] - mean], capsize=2,
              label={"tow": "ToW", "tow_mia": "ToW-MIA"}[key])  # fmt: skip
    b.set_xticks(xs, labels, rotation=60, ha="right", fontsize=8)
    b.set_ylim(max(0.0, min(r["tow"] for r in rows) - 0.1), 1.0)
    b.set_title("unlearning quality vs retrained model (mean, 95% CI over seeds)")
    b.legend()
    for r in route:
        c.errorbar(r["unlearn_cpu_s"], r["tow"], xerr=r["unlearn_cpu_s_std"], yerr=r["tow_std"],
                   fmt="o", capsize=3, label=r["strategy"])  # fmt: skip
    ex, ap = route[0], route[1]
    c.plot([ap["unlearn_cpu_s"], ex["unlearn_cpu_s"]], [ap["tow"], ex["tow"]], "k:", lw=1)
    c.set_xlabel("unlearning CPU seconds (all requests)")
    c.set_ylabel("ToW vs exact (SISA)")
    c.set_title("routing: time vs quality")
    c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
