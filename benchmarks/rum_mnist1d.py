"""RUM and the memorization proxies on MNIST-1D: a reliable exact estimator, each proxy's
cost and rank agreement with it, and RUM's ToW and U-LiRA against the plain algorithms.

Run in parts (each one invocation, so no part holds the machine long; every part writes
its own JSON under --out and the last one merges them):

    python benchmarks/rum_mnist1d.py exact  --seed S --out results/rum_mnist1d [--max-seconds T]
    python benchmarks/rum_mnist1d.py eval   --seed S --out results/rum_mnist1d
    python benchmarks/rum_mnist1d.py ulira  --seed S --out results/rum_mnist1d
    python benchmarks/rum_mnist1d.py report --seeds 1 2 3 --tune-seed 0 --out results/rum_mnist1d

(``--quick`` on every part: small sizes for a smoke run; ``--tiny`` smaller still, the test's
size; ``--local``: exact and ulira in this process, without Ray. ``--data bbcnews``: the
same parts on the bbcnews articles, see below.)

Data (per seed S, fresh): MNIST-1D generated offline (``data.source: mnist1d``, generator
seed S, ``n_samples`` rows, owners and the 80/20 split with seed S). Every model is the
platform's MLP on the 40 features, trained with Adam (``FitSpec``; sizes in ``FULL``).

1. ``exact``: Feldman's estimator (subset models keeping 70% of the training rows, as Ray
   tasks on 2 CPUs) grown by ``models_step`` models until its split-half reliability (the
   mean Spearman correlation between the estimates of two disjoint random halves of the
   models, over 20 random partitions: ``split_half_reliability``) reaches 0.8, or
   ``max_models``. Resumable: the models so far are kept in ``exact_seed<S>.npz`` and a
   later call continues (``--max-seconds`` stops after a batch past that time). Cost: the
   wall time of the training (2 tasks at a time) and the sum of the models' CPU seconds.
2. ``eval``: the proxies (confidence, max_confidence, entropy, binary_accuracy as running
   means over the epochs of one model trained on every row; holdout_kl fine-tunes it on
   half the test rows), each with its cost (one thread, in process: wall and CPU seconds)
   and its Spearman correlation and top-decile overlap with the exact scores. Then two
   forget sets of ``forget`` training rows: ``random`` (a uniform draw) and ``high`` (a
   random half of the top ``2 * forget`` rows by exact memorization: the rows a model
   memorized most). For each: the reference retrained from scratch without them; RUM with
   each score (tertiles low -> finetune, medium -> neggrad_plus, high -> salun; 3 epochs,
   lr 1e-3) and each plain algorithm on the whole set (same settings), measured against the
   reference by ToW and ToW-MIA (``platform.eval.tow.quality``, the MIA averaged over 10
   fits) on the other half of the test rows. Then RUM with the scores of ``REPEATED`` again
   ``rum_repeats`` times with other unlearning seeds (``repeats``): how much one RUM run's
   ToW moves when nothing but the run's randomness changes.
3. ``ulira``: U-LiRA (``platform.eval.lira``). Per forget-set kind, a pool of
   ``2 * forget`` candidate rows (the kind's draw, as in 2) and ``shadows`` shadows (Ray
   tasks): shadow s trains a model on every training row (its own seed), forgets the pool
   rows of ``membership_matrix(...)[s]`` (about half) by each method (RUM with the exact
   scores, RUM with each of the shadow's own proxies, every plain algorithm, and no
   unlearning as the control) and is retrained from scratch without them. Leave-one-out:
   each shadow in turn is the target, scored with Gaussians fitted to the other shadows
   (``fit_ulira``, pooled variance: fewer than 32 shadows; online scores): its forgotten
   rows after unlearning are the positives, the same rows under its retrained model the
   negatives. AUC and TPR at 1% / 0.1% FPR over all targets' rows; an exact retrain
   scores AUC 0.5 and TPR = FPR.
4. ``report``: means, sd and Student-t 95% intervals over the seeds given; the targets.
   With ``--tune-seed T`` the best proxy (by Spearman) and each forget set's best plain
   algorithm (by ToW) are chosen on seed T's eval and reported on ``--seeds`` (which must
   not hold T); ``rum_mnist1d.md`` has the tables in Markdown.

Seeds: seed 0 was used only to choose the sizes in ``FULL`` (the MLP [256, 256] for 20
epochs, because it fits the training rows: 0.99 train vs 0.56 test accuracy, so there is
memorization to measure; on seed 0 the estimator reached split-half 0.81 with 32 models)
and is not reported; seeds 1-3 are reported. The forget size and the 12 shadows were set
by the time budget, not by results. RUM's and the algorithms' settings are the platform's
defaults, not tuned. Seed 0's eval chooses the "best plain algorithm" and the best proxy
(``--tune-seed 0``); seeds 1-5 are reported.

``--data bbcnews`` (``TEXT_FULL``): the 2225 bbcnews articles (5 classes), each one a row of
384 features, the frozen MiniLM's (the platform's ``hf_encoder``, all-minilm-l6-v2, first
128 tokens) mean-pooled embedding, computed once and cached in ``--out`` (about 2 minutes
on 2 cores); the model is an MLP [128] head on them (20 epochs; on seed 0, training
accuracy 1.0 and test 0.975). The corpus is fixed, so a seed re-draws the 80/20 split
(``held_out_mask``), the forget sets and every model's initialisation, not the data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from ray_unlearn.platform.core.config import ModelConfig
from ray_unlearn.platform.core.data import DataConfig, load_dataset, split_train_test
from ray_unlearn.platform.core.data.config import Mnist1dConfig
from ray_unlearn.platform.core.storage import Storage
from ray_unlearn.platform.core.training import derive_seed, torch_threads
from ray_unlearn.platform.eval.tow import quality, seed_interval
from ray_unlearn.platform.methods.approximate import ALGORITHMS, ApproxSettings, unlearn
from ray_unlearn.platform.methods.rum.memorization import (
    PROXIES,
    FitSpec,
    as_memorization,
    fit,
    holdout_kl,
    memorization_from_runs,
    split_half_reliability,
    subset_model_correctness,
    train_with_proxies,
)
from ray_unlearn.platform.methods.rum.unlearn import RumPlan, rum_unlearn

FULL = {
    "n_samples": 4000,  # about 3200 training and 800 test rows
    "hidden": [256, 256],
    "epochs": 20,
    "batch_size": 64,
    "lr": 2e-3,
    "keep": 0.7,
    "models_step": 16,
    "max_models": 256,
    "reliability": 0.8,
    "splits": 20,
    "forget": 160,
    "shadows": 12,
    "approx_epochs": 3,
    "approx_lr": 1e-3,
    "rum_repeats": 3,  # extra RUM runs per score with other unlearning seeds (run-to-run noise)
}
QUICK = {**FULL, "n_samples": 600, "hidden": [64], "epochs": 8, "models_step": 4, "max_models": 8,
         "forget": 24, "shadows": 4}  # fmt: skip
# bbcnews: 2225 articles, 5 classes; features are the frozen MiniLM's mean-pooled embedding
# (384 floats) of each article's first 128 tokens, computed once; the model is a one-hidden-
# layer head on them, so a subset model trains in well under a second on one thread.
TEXT_FULL = {**FULL, "n_samples": 2225, "hidden": [128], "forget": 100, "max_models": 128}
TEXT_QUICK = {**TEXT_FULL, "n_samples": 300, "hidden": [32], "epochs": 8, "models_step": 4,
              "max_models": 8, "forget": 16, "shadows": 4}  # fmt: skip
# the smallest run of every part, for the test (tests/test_rum_benchmark.py): seconds
TINY = {**QUICK, "n_samples": 300, "hidden": [64], "epochs": 10, "lr": 1e-2, "max_models": 4,
        "forget": 12, "rum_repeats": 1, "approx_epochs": 1}  # fmt: skip
TEXT_TINY = {**TINY, "n_samples": 200, "forget": 10}
PROFILES = {"mnist1d": {"full": FULL, "quick": QUICK, "tiny": TINY},
            "bbcnews": {"full": TEXT_FULL, "quick": TEXT_QUICK, "tiny": TEXT_TINY}}  # fmt: skip
SCORES = ("exact", *PROXIES, "holdout_kl")
KINDS = ("random", "high")
_REPEAT = 0x52455054  # "REPT": the unlearning seeds of the repeated RUM runs
# the scores whose RUM runs eval repeats: exact and the proxy with the highest Spearman on the
# tuning seed 0 of MNIST-1D (confidence, 0.846); each repeat is a whole RUM run plus its ToW
REPEATED = ("exact", "confidence")
_SHADOW = 0x554C4952  # "ULIR"


def spec_of(p: dict) -> FitSpec:
    shape, classes = ((384,), 5) if p.get("data") == "bbcnews" else ((40,), 10)
    return FitSpec(ModelConfig(kind="mlp", hidden=list(p["hidden"])), shape, classes,
                   p["epochs"], p["batch_size"], p["lr"])  # fmt: skip


def embed_bbcnews(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(2225, 384) float32 MiniLM embeddings of the bbcnews articles and their labels, cached
    in ``out``: the platform's frozen ``hf_encoder`` (all-minilm-l6-v2, first 128 tokens),
    mean of the non-padding tokens' last hidden states (what its linear head reads)."""
    cache = out / "bbcnews_minilm.npz"
    if cache.exists():
        d = np.load(cache)
        return d["x"], d["y"]
    from ray_unlearn.platform.core.data.text import make_bbcnews
    from ray_unlearn.platform.core.encoders import TextEncoder, build_hf_encoder

    table = make_bbcnews()
    texts, y = table.column("text").to_pylist(), table.column("label").to_numpy()
    clf, ids = build_hf_encoder((128,), 5), torch.from_numpy(TextEncoder()(texts)).long()
    feats = []
    with torch.no_grad():
        for b in ids.split(64):  # (64, 128) token ids a batch
            mask = b != clf.pad_id
            h = clf.encoder(input_ids=b, attention_mask=mask.long()).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            feats.append(((h * m).sum(1) / m.sum(1).clamp(min=1.0)).numpy())  # (B, 384)
    x = np.ascontiguousarray(np.concatenate(feats), np.float32)
    np.savez_compressed(cache, x=x, y=y.astype(np.int64))
    return x, y.astype(np.int64)


def load(p: dict, seed: int, out: Path):
    """(x, y, test_x, test_y) of the seed's data: MNIST-1D generated afresh (generator seed =
    ``seed``); bbcnews, a fixed corpus, split 80/20 afresh (``held_out_mask`` with ``seed``,
    the platform's split) and subsampled to ``n_samples`` rows when that is smaller."""
    if p.get("data") == "bbcnews":
        from ray_unlearn.platform.core.data.split import held_out_mask

        x, y = embed_bbcnews(out)
        rows = np.arange(len(y))
        if p["n_samples"] < len(y):
            rows = np.sort(np.random.default_rng([seed, 7]).choice(len(y), p["n_samples"], False))
        held = held_out_mask(rows, 0.2, seed)
        tr, te = rows[~held], rows[held]
        return x[tr], y[tr], x[te], y[te]
    cfg = DataConfig(source="mnist1d", mnist1d=Mnist1dConfig(n_samples=p["n_samples"], seed=seed),
                     seed=seed, test_fraction=0.2)  # fmt: skip
    train, test = split_train_test(load_dataset(cfg, Storage(out / "data")), 0.2, seed)
    f32 = np.float32
    return (np.ascontiguousarray(train.features, f32), train.labels.astype(np.int64),
            np.ascontiguousarray(test.features, f32), test.labels.astype(np.int64))  # fmt: skip


def _t(x, y):
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, np.int64))


# -- 1. the exact estimator, grown until it is reliable ------------------------------------------


def _local_runs(spec: FitSpec, x, y, indices, *, keep: float, seed: int):
    """``subset_runs_ray``'s (masks, correctness, CPU seconds) in this process, one by one."""
    runs = []
    for i in indices:
        c0 = time.process_time()
        mask, correct = subset_model_correctness(spec, x, y, keep, seed, int(i))
        runs.append((mask, correct, time.process_time() - c0))
    return tuple(np.array([r[k] for r in runs]) for k in range(3))


def _ray(p: dict):
    """The started ``ray`` module, or None with ``--local`` (nothing imported then)."""
    if p.get("local"):
        return None
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


def part_exact(p: dict, seed: int, out: Path, max_seconds: float | None) -> dict:
    x, y, _, _ = load(p, seed, out)
    spec, npz = spec_of(p), out / f"exact_seed{seed}.npz"
    rec_path = out / f"exact_seed{seed}.json"
    rec = json.loads(rec_path.read_text()) if rec_path.exists() else {"curve": [], "wall_s": 0.0}
    masks, correct, cpu = (
        (lambda d: (d["masks"], d["correct"], d["cpu"]))(np.load(npz))
        if npz.exists()
        else (np.zeros((0, len(y)), bool), np.zeros((0, len(y)), bool), np.zeros(0))
    )
    ray = _ray(p)
    if ray is None:
        runs = _local_runs
    else:
        from ray_unlearn.train.memorization import subset_runs_ray as runs
    start = time.perf_counter()
    try:
        while len(masks) < p["max_models"] and not rec.get("reached"):
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
            idx = range(len(masks), len(masks) + p["models_step"])
            t0 = time.perf_counter()
            m, c, s = runs(spec, x, y, idx, keep=p["keep"], seed=seed)
            rec["wall_s"] += time.perf_counter() - t0
            masks, correct, cpu = np.concatenate([masks, m]), np.concatenate([correct, c]), \
                np.concatenate([cpu, s])  # fmt: skip
            np.savez_compressed(npz, masks=masks, correct=correct, cpu=cpu)
            rel = split_half_reliability(masks, correct, splits=p["splits"], seed=seed)
            rel.update(wall_s=rec["wall_s"], cpu_s=float(cpu.sum()))
            rec["curve"].append(rel)
            rec["reached"] = rel["mean"] >= p["reliability"]
            print(f"seed {seed}: {len(masks)} models, split-half {rel['mean']:.3f} "
                  f"(min {rel['min']:.3f}), {rec['wall_s']:.0f} s", flush=True)  # fmt: skip
            rec_path.write_text(json.dumps(rec, indent=2))
    finally:
        if ray is not None:
            ray.shutdown()
    rec.update(models=len(masks), cpu_s=float(cpu.sum()), settings=p)
    rec_path.write_text(json.dumps(rec, indent=2))
    return rec


def exact_scores(out: Path, seed: int) -> tuple[np.ndarray, dict]:
    d, rec = (
        np.load(out / f"exact_seed{seed}.npz"),
        json.loads((out / f"exact_seed{seed}.json").read_text()),
    )
    return memorization_from_runs(d["masks"], d["correct"]), rec


# -- forget sets ---------------------------------------------------------------------------------


def forget_pool(kind: str, mem: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``2 * size`` candidate rows: ``random``, a uniform draw; ``high``, the most memorized
    rows by the exact scores (no estimate: never picked)."""
    n = len(mem)
    if 2 * size > n:
        raise ValueError(f"forget size {size}: the pool of {2 * size} exceeds {n} training rows")
    if kind == "random":
        return np.sort(np.random.default_rng([seed, 5]).choice(n, 2 * size, replace=False))
    if kind == "high":
        order = np.argsort(-np.where(np.isnan(mem), -np.inf, mem), kind="stable")
        return np.sort(order[: 2 * size])
    raise ValueError(f"unknown forget set {kind!r}; known: {', '.join(KINDS)}")


def forget_rows(kind: str, mem: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The evaluated forget set: a random half of the kind's pool."""
    pool = forget_pool(kind, mem, size, seed)
    return np.sort(np.random.default_rng([seed, 6]).choice(pool, size, replace=False))


def top_overlap(score: np.ndarray, exact: np.ndarray, share: float = 0.1) -> float:
    """Share of the exact scores' top ``share`` rows that ``score`` also ranks there."""
    k = max(1, int(round(share * len(exact))))
    top = set(np.argsort(-exact, kind="stable")[:k].tolist())
    return len(top & set(np.argsort(-score, kind="stable")[:k].tolist())) / k


# -- 2. proxies and ToW --------------------------------------------------------------------------


def _timed(fn, *args, **kwargs):
    t0, c0 = time.perf_counter(), time.process_time()
    got = fn(*args, **kwargs)
    return got, time.perf_counter() - t0, time.process_time() - c0


def holdout_split(n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(hold, ev): a random half of the test rows for ``holdout_kl``, the other for ToW."""
    half = np.random.default_rng([seed, 3]).permutation(n_test)
    return half[: n_test // 2], half[n_test // 2 :]


def part_eval(p: dict, seed: int, out: Path) -> dict:
    x, y, tx, ty = load(p, seed, out)
    spec = spec_of(p)
    mem, ex = exact_scores(out, seed)
    rec: dict = {"rows": {"train": len(y), "test": len(ty)}, "exact_models": ex["models"],
                 "exact_split_half": ex["curve"][-1]["mean"], "scores": {}}  # fmt: skip
    cost = {"exact": {"wall_s": ex["wall_s"], "cpu_s": ex["cpu_s"]}}
    _, plain_s, plain_cpu = _timed(fit, spec, *_t(x, y), seed)
    (model, proxies), wall, cpu = _timed(train_with_proxies, spec, x, y, seed)
    scores = {"exact": mem, **proxies}
    for k in PROXIES:
        cost[k] = {"wall_s": wall, "cpu_s": cpu, "marginal_cpu_s": max(cpu - plain_cpu, 0.0)}
    hold, ev = holdout_split(len(ty), seed)
    scores["holdout_kl"], w, c = _timed(holdout_kl, spec, model, x, tx[hold], ty[hold], seed=seed)
    cost["holdout_kl"] = {"wall_s": plain_s + w, "cpu_s": plain_cpu + c, "marginal_cpu_s": c}
    ok = ~np.isnan(mem)
    for k, v in scores.items():
        m = as_memorization(k, v)[ok]
        rec["scores"][k] = {
            **cost[k],
            "cpu_ratio": cost["exact"]["cpu_s"] / cost[k]["cpu_s"],
            "spearman": float(spearmanr(m, mem[ok]).statistic),
            "top10_overlap": top_overlap(m, mem[ok]),
        }
    with torch.no_grad():
        rec["accuracy"] = {
            "train": float((model(_t(x, y)[0]).argmax(1).numpy() == y).mean()),
            "test": float((model(_t(tx, ty)[0]).argmax(1).numpy() == ty).mean()),
        }
    test_t = _t(tx[ev], ty[ev])
    settings = ApproxSettings(epochs=p["approx_epochs"], lr=p["approx_lr"], seed=seed)
    rec["forget"], rec["repeats"] = {}, {}
    for kind in KINDS:
        f = forget_rows(kind, mem, p["forget"], seed)
        keep = np.setdiff1d(np.arange(len(y)), f)
        forget, retain = _t(x[f], y[f]), _t(x[keep], y[keep])
        reference = fit(spec, *retain, seed)

        def measure(m, forget=forget, retain=retain, reference=reference):
            q = quality(m, reference, forget, retain, test_t, seed=seed)
            return {k: q[k] for k in ("tow", "tow_mia", "model_accuracy_forget",
                                      "reference_accuracy_forget", "model_accuracy_test")}  # fmt: skip

        r = {"exact_mean_memorization": float(np.nanmean(mem[f])), "original": measure(model)}
        for k, v in scores.items():
            got, w, _ = _timed(rum_unlearn, model, forget, retain, v[f], RumPlan(k), settings)
            r[f"rum:{k}"] = {**measure(got), "unlearn_s": w}
        for a in ALGORITHMS:
            got, w, _ = _timed(unlearn, a, model, forget, retain, settings)
            r[a] = {**measure(got), "unlearn_s": w}
        rec["forget"][kind] = r
        # the same RUM again with other unlearning seeds (batch order, random init of the
        # steps): how much ToW moves when only the run's randomness changes
        rec["repeats"][kind] = {
            f"rum:{k}": [r[f"rum:{k}"]["tow"]] + [
                measure(rum_unlearn(model, forget, retain, v[f], RumPlan(k), replace(
                    settings, seed=derive_seed(seed, _REPEAT, i))))["tow"]
                for i in range(p["rum_repeats"])]
            for k, v in scores.items() if k in REPEATED
        }  # fmt: skip
        print(f"seed {seed} {kind}: " + ", ".join(f"{k} {v['tow']:.3f}" for k, v in r.items()
                                                    if isinstance(v, dict)), flush=True)  # fmt: skip
    return rec


# -- 3. U-LiRA -----------------------------------------------------------------------------------


def _conf(model, x: torch.Tensor, y: np.ndarray) -> np.ndarray:
    from ray_unlearn.platform.eval.lira import confidence

    with torch.no_grad():
        return confidence(model(x).double().numpy(), y, outputs="logits")


def ulira_shadow(
    p: dict, x, y, hold: tuple, pool, mask, mem, seed: int, index: int
) -> dict[str, np.ndarray]:
    """One U-LiRA shadow: (n_pool,) confidences of each method's model on the pool rows.

    RUM runs with every score: the exact one (the target seed's estimator, shared by the
    shadows) and each proxy of the shadow's own model (``holdout_kl`` fine-tuned on
    ``hold``, the held-out test half, as in ``eval``)."""
    spec = spec_of(p)
    settings = ApproxSettings(epochs=p["approx_epochs"], lr=p["approx_lr"], seed=seed)
    f = pool[mask]
    keep = np.setdiff1d(np.arange(len(y)), f)
    forget, retain = _t(x[f], y[f]), _t(x[keep], y[keep])
    px, py = _t(x[pool], y[pool])[0], y[pool]
    with torch_threads(1):
        model, proxies = train_with_proxies(spec, x, y, derive_seed(seed, _SHADOW, index))
        out = {"retrained": _conf(fit(spec, *retain, derive_seed(seed, _SHADOW, index, 1)), px, py),
               "original": _conf(model, px, py)}  # fmt: skip
        proxies["holdout_kl"] = holdout_kl(spec, model, x, *hold, seed=seed)
        for name, s in (("exact", mem[f]), *((k, proxies[k][f]) for k in SCORES[1:])):
            out[f"rum:{name}"] = _conf(rum_unlearn(model, forget, retain, s, RumPlan(name),
                                                   settings), px, py)  # fmt: skip
        for a in ALGORITHMS:
            out[a] = _conf(unlearn(a, model, forget, retain, settings), px, py)
    return out


def leave_one_out(conf: dict[str, np.ndarray], masks: np.ndarray) -> dict[str, dict]:
    """Each shadow the target in turn, Gaussians from the others: U-LiRA's metrics per method."""
    from ray_unlearn.platform.eval.lira import attack_metrics, fit_ulira, online_scores

    res = {}
    for name, c in conf.items():
        if name == "retrained":
            continue
        pos, neg = [], []
        for t in range(len(masks)):
            rest = np.arange(len(masks)) != t
            g = fit_ulira(c[rest], conf["retrained"][rest], masks[rest], global_variance=True)
            pos.append(online_scores(c[t], g)[masks[t]])
            neg.append(online_scores(conf["retrained"][t], g)[masks[t]])
        pos, neg = np.concatenate(pos), np.concatenate(neg)
        truth = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
        res[name] = attack_metrics(np.concatenate([pos, neg]), truth).as_dict()
    return res


def part_ulira(p: dict, seed: int, out: Path) -> dict:
    from ray_unlearn.platform.eval.lira import membership_matrix

    x, y, tx, ty = load(p, seed, out)
    hold = (lambda h: (tx[h], ty[h]))(holdout_split(len(ty), seed)[0])
    mem, _ = exact_scores(out, seed)
    ray = _ray(p)
    rec: dict = {"shadows": p["shadows"]}
    try:
        if ray is None:
            put, run = (lambda v: v), (lambda calls: [ulira_shadow(*c) for c in calls])
        else:
            task = ray.remote(num_cpus=1)(ulira_shadow)
            put, run = ray.put, (lambda calls: ray.get([task.remote(*c) for c in calls]))
        xr, yr, hr, mr = put(x), put(y), put(hold), put(mem)
        for kind in KINDS:
            t0 = time.perf_counter()
            pool = forget_pool(kind, mem, p["forget"], seed)
            masks = membership_matrix(len(pool), p["shadows"], seed=seed)
            got = run([(p, xr, yr, hr, pool, m, mr, seed, s) for s, m in enumerate(masks)])
            conf = {k: np.stack([g[k] for g in got]) for k in got[0]}
            rec[kind] = {"seconds": time.perf_counter() - t0, "pool": len(pool),
                         "methods": leave_one_out(conf, masks)}  # fmt: skip
            print(f"seed {seed} {kind}: U-LiRA AUC " + ", ".join(
                f"{k} {v['auc']:.3f}" for k, v in rec[kind]["methods"].items()), flush=True)  # fmt: skip
    finally:
        if ray is not None:
            ray.shutdown()
    return rec


# -- 4. report -----------------------------------------------------------------------------------


def _interval(vals) -> dict:
    i = seed_interval(vals)
    return {"mean": i["mean"], "sd": i["sd"], "ci95": [i["ci95_low"], i["ci95_high"]],
            "per_seed": [float(v) for v in vals]}  # fmt: skip


def report(
    out: Path, seeds: list[int], tune_seed: int | None = None, tune_out: Path | None = None
) -> dict:
    """Means and intervals over ``seeds``. The best proxy (by Spearman with exact) and each
    forget set's best plain algorithm (by ToW) are chosen on ``tune_seed``'s eval, a seed
    that is not reported; without one they are chosen on the reported seeds (optimistic for
    the chosen ones, and said so in ``targets``). ``tune_out``: where the tuning seed's eval
    is, when it is another data set's (default ``out``; then the seed must not be reported)."""
    if tune_seed is not None and tune_seed in seeds and tune_out in (None, out):
        raise ValueError(f"the tuning seed {tune_seed} must not be among the reported {seeds}")
    ex = [json.loads((out / f"exact_seed{s}.json").read_text()) for s in seeds]
    ev = [json.loads((out / f"eval_seed{s}.json").read_text()) for s in seeds]
    ul_seeds = [s for s in seeds if (out / f"ulira_seed{s}.json").exists()]
    ul = [json.loads((out / f"ulira_seed{s}.json").read_text()) for s in ul_seeds]
    doc: dict = {"seeds": seeds, "tune_seed": tune_seed, "ulira_seeds": ul_seeds, "exact": {
        "models_per_seed": [e["models"] for e in ex],
        "reached_0.8_per_seed": [bool(e.get("reached")) for e in ex],
        "split_half": _interval([e["curve"][-1]["mean"] for e in ex]),
        "curves": {s: e["curve"] for s, e in zip(seeds, ex, strict=True)}},
        "accuracy": {k: _interval([e["accuracy"][k] for e in ev]) for k in ("train", "test")}}  # fmt: skip
    doc["scores"] = {
        k: {m: _interval([e["scores"][k][m] for e in ev])
            for m in ("cpu_s", "wall_s", "cpu_ratio", "spearman", "top10_overlap")}
        for k in SCORES
    }  # fmt: skip
    doc["forget"] = {}
    for kind in KINDS:
        names = [n for n in ev[0]["forget"][kind] if isinstance(ev[0]["forget"][kind][n], dict)]
        doc["forget"][kind] = {
            n: {m: _interval([e["forget"][kind][n][m] for e in ev]) for m in ("tow", "tow_mia")}
            for n in names
        }
        for n, v in doc["forget"][kind].items():  # each method over the seeds that scored it
            have = [(s, u) for s, u in zip(ul_seeds, ul, strict=True) if n in u[kind]["methods"]]
            if have:
                v["ulira_seeds"] = [s for s, _ in have]
                v["ulira"] = {m: _interval([u[kind]["methods"][n][m] for _, u in have])
                              for m in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")}  # fmt: skip
    tune_file = (tune_out or out) / f"eval_seed{tune_seed}.json"
    tune = json.loads(tune_file.read_text()) if tune_seed is not None else None
    proxies = [k for k in SCORES if k != "exact"]
    if tune is None:
        best = max(proxies, key=lambda k: doc["scores"][k]["spearman"]["mean"])
    else:
        best = max(proxies, key=lambda k: tune["scores"][k]["spearman"])
    chosen_on = "the reported seeds" if tune is None else f"tuning seed {tune_seed}" + (
        f" of {tune_out}" if tune_out not in (None, out) else "")  # fmt: skip
    targets = {"best_proxy": best, "chosen_on": chosen_on,
               "best_proxy_by": "highest Spearman with exact", "best_plain_by": "highest ToW",
               "best_proxy_cpu_ratio": doc["scores"][best]["cpu_ratio"]["mean"],
               "exact_split_half_mean": doc["exact"]["split_half"]["mean"]}  # fmt: skip
    targets["proxy_20x_cheaper_than_reliable_exact"] = bool(
        targets["best_proxy_cpu_ratio"] >= 20 and all(doc["exact"]["reached_0.8_per_seed"])
    )
    for kind in KINDS:
        per = [e["forget"][kind] for e in ev]
        gap = _interval([q["rum:exact"]["tow"] - q[f"rum:{best}"]["tow"] for q in per])
        if tune is None:
            plain = max(ALGORITHMS, key=lambda a: doc["forget"][kind][a]["tow"]["mean"])
        else:
            plain = max(ALGORITHMS, key=lambda a: tune["forget"][kind][a]["tow"])
        vs = _interval([q["rum:exact"]["tow"] - q[plain]["tow"] for q in per])
        vs_p = _interval([q[f"rum:{best}"]["tow"] - q[plain]["tow"] for q in per])
        targets[kind] = {"tow_gap_exact_minus_best_proxy": gap, "within_0.02": abs(gap["mean"]) <= 0.02,
                         "best_plain": plain, "rum_exact_minus_best_plain": vs,
                         "rum_best_proxy_minus_best_plain": vs_p}  # fmt: skip
        reps = [e["repeats"][kind] for e in ev if "repeats" in e]
        if len(reps) == len(ev) and all(f"rum:{best}" in r for r in reps):
            targets[kind]["repeats"] = repeat_summary(reps, best)
    doc["targets"] = targets
    return doc


def repeat_summary(reps: list[dict], best: str) -> dict:
    """The ToW gap exact - ``best`` with each seed's RUM runs averaged over their unlearning
    seeds, and the run-to-run sd of one RUM's ToW within a seed (pooled over seeds)."""
    ex, pr = "rum:exact", f"rum:{best}"
    within = {k: float(np.sqrt(np.mean([np.var(r[k], ddof=1) for r in reps]))) for k in reps[0]}
    return {
        "runs_per_seed": len(reps[0][ex]),
        "tow_gap_exact_minus_best_proxy": _interval([np.mean(r[ex]) - np.mean(r[pr]) for r in reps]),
        "within_seed_sd": within,
        "gap_se_from_run_noise": float(np.sqrt((within[ex] ** 2 + within[pr] ** 2)
                                               / (len(reps[0][ex]) * len(reps)))),
    }  # fmt: skip


def print_report(doc: dict) -> None:
    f = lambda i: f"{i['mean']:.3f}+-{i['sd']:.3f}"  # noqa: E731
    e = doc["exact"]
    print(f"seeds {doc['seeds']}: exact models {e['models_per_seed']}, split-half {f(e['split_half'])}; "
          f"MLP accuracy train {f(doc['accuracy']['train'])} test {f(doc['accuracy']['test'])}")  # fmt: skip
    print(f"{'score':16} {'cpu s':>14} {'x cheaper':>14} {'spearman':>14} {'top10':>14}")
    for k, v in doc["scores"].items():
        print(f"{k:16} {f(v['cpu_s']):>14} {f(v['cpu_ratio']):>14} {f(v['spearman']):>14} "
              f"{f(v['top10_overlap']):>14}")  # fmt: skip
    for kind, rows in doc["forget"].items():
        print(f"forget set: {kind}")
        for n, v in rows.items():
            u = v.get("ulira")
            extra = (f"  U-LiRA AUC {f(u['auc'])} TPR@1% {f(u['tpr_at_1pct_fpr'])} "
                     f"TPR@0.1% {f(u['tpr_at_0.1pct_fpr'])}") if u else ""  # fmt: skip
            print(f"  {n:18} ToW {f(v['tow'])} ToW-MIA {f(v['tow_mia'])}{extra}")

    def brief(v):  # intervals as their means, for the console
        if isinstance(v, dict):
            return round(v["mean"], 4) if "mean" in v else {k: brief(x) for k, x in v.items()}
        return round(v, 4) if isinstance(v, float) else v

    print("targets:", json.dumps(brief(doc["targets"])))


def markdown(doc: dict) -> str:
    """The report's tables as Markdown (mean +- sd over the reported seeds), for docs/."""
    f = lambda i: f"{i['mean']:.3f} ± {i['sd']:.3f}"  # noqa: E731
    lines = ["| score | CPU s | exact CPU s / score's | Spearman with exact | top-decile overlap |",
             "|---|---|---|---|---|"]  # fmt: skip
    for k, v in doc["scores"].items():
        lines.append(f"| {k} | {f(v['cpu_s'])} | {f(v['cpu_ratio'])} | {f(v['spearman'])} | "
                     f"{f(v['top10_overlap'])} |")  # fmt: skip
    for kind, rows in doc["forget"].items():
        lines += ["", f"Forget set `{kind}`:", "",
                  "| method | ToW | ToW-MIA | U-LiRA AUC | TPR at 1% FPR | TPR at 0.1% FPR |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for n, v in rows.items():
            u = v.get("ulira")
            cells = [f(u[m]) for m in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")] if u \
                else ["-"] * 3  # fmt: skip
            if u and v["ulira_seeds"] != doc["ulira_seeds"]:  # fewer seeds than the others
                cells[0] += " (seed" + ("s " if len(v["ulira_seeds"]) > 1 else " ") + \
                    ", ".join(map(str, v["ulira_seeds"])) + ")"  # fmt: skip
            lines.append(f"| {n} | {f(v['tow'])} | {f(v['tow_mia'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("exact", "eval", "ulira", "report"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", type=Path, default=Path("results/rum_mnist1d"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="smaller than --quick: the test's size")
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--data", choices=tuple(PROFILES), default="mnist1d")
    ap.add_argument(
        "--local",
        action="store_true",
        help="exact and ulira in this process, without Ray (one core; for tests)",
    )
    ap.add_argument(
        "--tune-seed",
        type=int,
        default=None,
        help="report: the seed whose eval chooses the best plain algorithm and "
        "the best proxy (not among --seeds)",
    )
    ap.add_argument(
        "--tune-out",
        type=Path,
        default=None,
        help="report: the directory of the tuning seed's eval, when another data set chose "
        "(default --out)",
    )
    args = ap.parse_args(argv)
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    p = {**PROFILES[args.data][size], "data": args.data, "local": args.local}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    argv = sys.argv[1:] if argv is None else argv
    meta = {
        "command": " ".join([sys.executable, "benchmarks/rum_mnist1d.py", *argv]),
        "cpu_count": os.cpu_count(),
    }
    if args.part == "exact":
        part_exact(p, args.seed, args.out, args.max_seconds)
    elif args.part in ("eval", "ulira"):
        rec = (part_eval if args.part == "eval" else part_ulira)(p, args.seed, args.out)
        rec.update(meta, seconds=time.perf_counter() - t0, settings=p)
        (args.out / f"{args.part}_seed{args.seed}.json").write_text(json.dumps(rec, indent=2))
    else:
        doc = report(args.out, args.seeds, args.tune_seed, args.tune_out)
        doc.update(meta, settings=p)
        (args.out / "rum_mnist1d.json").write_text(json.dumps(doc, indent=2))
        (args.out / "rum_mnist1d.md").write_text(markdown(doc))
        print_report(doc)
    print(f"{args.part} done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
