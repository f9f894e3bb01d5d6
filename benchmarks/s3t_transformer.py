"""S3T on a pretrained transformer (all-MiniLM-L6-v2, frozen) with bbcnews text.

Run:  .venv/bin/python benchmarks/s3t_transformer.py --out results/s3t_transformer [--quick]

In process, no Ray (the platform's own S3T and SISA code, as its shard actors run it).
Per seed, the articles (bbcnews, tokenised by the component to ``max_length`` ids) are split
by seed into train / validation / test (70/15/15); a public part of the training rows
(``public_fraction``) trains the head of the frozen encoder: the backbone. Then, with the
same epochs, batch size and LoRA rank, accuracy on validation and test of

  frozen_head   the frozen encoder with its head trained on every training row;
  full_lora     one model: LoRA (query/value) on the same top ``num_blocks`` layers S3T
                adapts, plus the head, trained on every non-public training row in one
                stage (S3T with one shard, one slice, one order);
  s3t           the S3T ensemble: ``shards`` x ``slices`` (R), B orders per shard,
                ``num_blocks`` layers grouped over the R stages; mean probabilities;
  sisa_full     SISA with full fine-tuning: per shard every weight of a copy of the
                backbone trained on the shard's non-public rows, mean probabilities.

deletion: one sample per shard; ``s3t_delete_s`` is ``S3TShard.delete`` (deactivation, no
training), ``sisa_retrain_s`` the time to retrain that shard by full fine-tuning without
the sample (the cost SISA pays with one slice per shard: from scratch), and the ratio.

memory: parameter bytes one shard's process holds after training B = 1, 2 and L orders
(its base once, counted by storage, plus every order's adapters and heads), against one
base plus one order's adapters (``ratio`` to that). These are the model's tensors, not the
process's peak RSS (activations and the allocator's slack are not counted).

Choices are not tuned here (the learning rates are the config's); every figure is
reported on validation and test. --quick: 1 seed, 400 articles, 32 tokens, 2 shards x 2
slices, B = 1, 2 (= L); full: 3 seeds, every article, 64 tokens, 2 shards x 3 slices, B
up to 3, 3 layers. Writes <out>/s3t_transformer.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ray_unlearn.platform.core.config import ModelConfig, TrainingConfig
from ray_unlearn.platform.core.data.text import make_bbcnews
from ray_unlearn.platform.core.models import text_encoder_of
from ray_unlearn.platform.core.training import ShardData, predict_proba, train_stage
from ray_unlearn.platform.methods.s3t.backbone import full_finetune, pretrain_backbone
from ray_unlearn.platform.methods.s3t.config import S3TConfig
from ray_unlearn.platform.methods.s3t.training import (
    S3TShard,
    check_s3t,
    model_for,
    train_order,
)

NUM_CLASSES = 5


def _settings(quick: bool) -> dict:
    if quick:
        return dict(n=400, max_length=32, shards=2, slices=2, budgets=[1, 2], num_blocks=2,
                    seeds=[0], epochs=1, head_epochs=2)  # fmt: skip
    return dict(n=None, max_length=64, shards=2, slices=3, budgets=[1, 2, 3], num_blocks=3,
                seeds=[0, 1, 2], epochs=2, head_epochs=3)  # fmt: skip


def _args(s: dict) -> dict:
    return {"model": s["model"], "max_length": s["max_length"]}


def _shard_data(feats, labels, ids, shard, slices, num_slices) -> ShardData:
    return ShardData(
        shard=shard,
        sample_ids=np.asarray(ids, dtype=np.int64),
        slices=np.asarray(slices, dtype=np.int32),
        features=torch.from_numpy(np.ascontiguousarray(feats)),
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        num_slices=num_slices,
    )


def _acc(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def _probs(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return predict_proba(model, torch.from_numpy(x), batch_size=64).numpy()


def _bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (shared ones counted once)."""
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def run_seed(seed: int, s: dict, feats: np.ndarray, labels: np.ndarray) -> dict:
    """Every method on one seed's split (see the module doc)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    n_tr, n_va = int(0.7 * len(perm)), int(0.15 * len(perm))
    tr, va, te = perm[:n_tr], perm[n_tr : n_tr + n_va], perm[n_tr + n_va :]
    mcfg = ModelConfig(component="hf_encoder", args=_args(s))
    cfg = S3TConfig(
        budget=max(s["budgets"]), num_blocks=s["num_blocks"], lora_rank=4, lora_alpha=8,
        public_fraction=0.1, pretrain_epochs=s["head_epochs"], pretrain_lr=0.01,
        epochs=s["epochs"], lr=0.005, batch_size=16,
    )  # fmt: skip
    public = tr[: max(16, int(cfg.public_fraction * len(tr)))]
    private = tr[len(public) :]
    t0 = time.perf_counter()
    backbone = pretrain_backbone(
        mcfg, (s["max_length"],), NUM_CLASSES,
        _shard_data(feats[public], labels[public], public, 0x7FFE, np.zeros(len(public)), 1),
        cfg, seed,
    )  # fmt: skip
    out: dict = {"seed": seed, "train": len(tr), "val": len(va), "test": len(te)}
    out["backbone_s"] = time.perf_counter() - t0

    def score(name: str, val_probs: np.ndarray, test_probs: np.ndarray) -> None:
        out[f"val_{name}"], out[f"test_{name}"] = (
            _acc(val_probs, labels[va]),
            _acc(test_probs, labels[te]),
        )

    # frozen encoder, head trained on every training row
    t0 = time.perf_counter()
    head_only = copy.deepcopy(backbone)
    for n, p in head_only.named_parameters():
        p.requires_grad_(n.startswith("head."))
    train_stage(
        head_only,
        _shard_data(feats[tr], labels[tr], tr, 0, np.zeros(len(tr)), 1),
        0,
        TrainingConfig(epochs=s["head_epochs"], batch_size=16, lr=0.01),
        seed,
    )
    score("frozen_head", _probs(head_only, feats[va]), _probs(head_only, feats[te]))
    out["frozen_head_s"] = time.perf_counter() - t0
    del head_only

    blocks = check_s3t(cfg, backbone, s["slices"])
    # full LoRA: one stage adapting every block, every private row
    t0 = time.perf_counter()
    one = S3TConfig(**{**cfg.model_dump(), "budget": 1})
    all_rows = _shard_data(feats[private], labels[private], private, 0, np.zeros(len(private)), 1)
    (snap,) = train_order(backbone, all_rows, (0,), 90, one, seed=seed, blocks=blocks)
    lora = model_for(backbone, [snap], 1)
    score("full_lora", _probs(lora, feats[va]), _probs(lora, feats[te]))
    out["full_lora_s"] = time.perf_counter() - t0

    # shards and slices of the private rows
    shard_of = rng.integers(0, s["shards"], len(private))
    slice_of = rng.integers(0, s["slices"], len(private))
    shard_rows = [private[shard_of == k] for k in range(s["shards"])]
    shard_slices = [slice_of[shard_of == k] for k in range(s["shards"])]

    # S3T with the largest budget (B = L in quick mode); memory for every budget
    t0 = time.perf_counter()
    shards = {}
    for k, rows in enumerate(shard_rows):
        data = _shard_data(feats[rows], labels[rows], rows, k, shard_slices[k], s["slices"])
        shards[k] = S3TShard.train(backbone, data, cfg, seed=seed, blocks=blocks)
    out["s3t_train_s"] = time.perf_counter() - t0
    score(
        "s3t",
        np.mean([sh.predict_proba(feats[va]) for sh in shards.values()], axis=0),
        np.mean([sh.predict_proba(feats[te]) for sh in shards.values()], axis=0),
    )

    base = _bytes(dict(backbone.named_parameters()).values())

    def own_bytes(b: int) -> int:  # adapters and heads of shard 0's first b orders
        snaps = [st for o in shards[0].snapshots[:b] for st in o if st is not None]
        return _bytes([t for st in snaps for t in st.tensors().values()])

    out["memory"] = {
        f"B={b}": {
            "bytes": base + own_bytes(b),
            "base_bytes": base,
            "ratio_to_base_plus_one_order": (base + own_bytes(b)) / (base + own_bytes(1)),
        }
        for b in s["budgets"]
    }

    # SISA: per-shard full fine-tuning of a copy of the backbone, at a full-weight rate for
    # a pretrained transformer (the head's 0.01 makes every weight diverge: measured once)
    full_cfg = S3TConfig(**{**cfg.model_dump(), "pretrain_lr": 5e-5})
    t0 = time.perf_counter()
    sisa, sisa_s = [], []
    for k, rows in enumerate(shard_rows):
        data = _shard_data(feats[rows], labels[rows], rows, k, np.zeros(len(rows)), 1)
        t1 = time.perf_counter()
        sisa.append(full_finetune(backbone, data, full_cfg, seed))
        sisa_s.append(time.perf_counter() - t1)
    out["sisa_train_s"] = time.perf_counter() - t0
    score(
        "sisa_full",
        np.mean([_probs(m, feats[va]) for m in sisa], axis=0),
        np.mean([_probs(m, feats[te]) for m in sisa], axis=0),
    )
    sisa.clear()

    # deletion: one sample per shard
    dels = []
    for k, rows in enumerate(shard_rows):
        victim = rows[:1]
        t1 = time.perf_counter()
        shards[k].delete(victim)
        dels.append(time.perf_counter() - t1)
    out["s3t_delete_s"] = float(np.median(dels))
    out["sisa_retrain_s"] = float(np.median(sisa_s))  # retrain = train the shard again
    out["delete_speedup"] = out["sisa_retrain_s"] / out["s3t_delete_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--quick", action="store_true", help="small settings (a few minutes)")
    ap.add_argument("--model", default="all-minilm-l6-v2", help="hf_encoder model (or a dir)")
    ap.add_argument("--n", type=int, default=None, help="use only n articles")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("RAY_UNLEARN_BENCH_THREADS", "1")))
    s = {**_settings(args.quick), "model": args.model}
    if args.n is not None:
        s["n"] = args.n
    table = make_bbcnews()
    labels_all = table.column("label").to_numpy()
    texts = table.column("text").to_pylist()
    if s["n"] is not None:  # a random subset, fixed
        pick = np.random.default_rng(1234).permutation(len(texts))[: s["n"]]
        texts, labels_all = [texts[i] for i in pick], labels_all[pick]
    feats = text_encoder_of(ModelConfig(component="hf_encoder", args=_args(s)))(texts)
    runs = [run_seed(seed, s, feats, labels_all) for seed in s["seeds"]]
    keys = ["frozen_head", "full_lora", "s3t", "sisa_full"]
    summary = {
        f"test_{k}": {
            "mean": float(np.mean([r[f"test_{k}"] for r in runs])),
            "sd": float(np.std([r[f"test_{k}"] for r in runs])),
        }
        for k in keys
    }
    doc = {"settings": s, "runs": runs, "summary": summary, "quick": args.quick}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "s3t_transformer.json").write_text(json.dumps(doc, indent=2))
    print(f"{'method':<12} {'val':>6} {'test':>6}")
    for k in keys:
        v = np.mean([r[f"val_{k}"] for r in runs])
        print(f"{k:<12} {v:6.3f} {summary[f'test_{k}']['mean']:6.3f}")
    r0 = runs[0]
    print(
        f"deletion: s3t {r0['s3t_delete_s'] * 1e3:.3f} ms, sisa retrain {r0['sisa_retrain_s']:.1f} s, "
        f"x{r0['delete_speedup']:.0f}"
    )
    for b, m in r0["memory"].items():
        print(
            f"memory {b}: {m['bytes'] / 2**20:.1f} MiB (x{m['ratio_to_base_plus_one_order']:.3f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
