"""S3T on a pretrained transformer (all-MiniLM-L6-v2) with bbcnews text: accuracy against
full LoRA fine-tuning, SISA full fine-tuning and the frozen encoder with a trained head;
deletion time; peak memory of a shard process.

Run (every part in one go, or one part per invocation and then ``--part merge``):

  .venv/bin/python benchmarks/s3t_transformer.py --out results/s3t_transformer [--quick]
  ... --part select            # every setting, chosen on the validation split of seed 0
  ... --part report --seeds 0  # one seed's validation and test figures (then 1, 2)
  ... --part memory            # peak RSS of a shard process with B = 1, 2, L orders
  ... --part merge             # s3t_transformer.json, s3t_transformer.png, the table

Protocol. The articles are tokenised to ``max_length`` ids by the component. Per seed they
are split (by the seed) into train / validation / test (70/15/15); the first
``public_fraction`` of the training rows is S3T's public split; the rest, the private rows,
are cut into ``shards`` shards and ``slices`` slices (by the seed). Methods:

  frozen_head  the frozen encoder with a head trained on every training row;
  full_lora    one model: LoRA (query/value) on the top ``num_blocks`` layers plus the head,
               from the public backbone, on every private row in one stage (S3T's own code
               with one shard, one slice, one order);
  lora_shards  (diagnostic) the same per shard, ensembled: the cost of sharding alone;
  s3t          the S3T ensemble (``shards`` x R slices, the ``num_blocks`` layers grouped
               over the R stages, mean probabilities of the shards' served models);
  sisa_full    SISA with full fine-tuning: per shard every weight of the backbone (encoder
               included) trained on the shard's private rows, mean probabilities.

Settings (learning rates, epochs, LoRA rank, the head's pre-training) are chosen on the
*validation* split of the selection seed (0) only, from the grids in :func:`_grids`; the
report runs every seed with the chosen settings and gives validation and test accuracy.
Test accuracy is never used to choose.

Before any deletion S3T serves order 0's deepest stage, whatever B is (the other orders
are spares for deletions), so accuracy is measured with B = 1 and the B orders are trained
only by the memory part.

Frozen layers are computed once: every LoRA method adapts only the top ``num_blocks``
layers, so the layers below are a fixed function of the text. Their output (the hidden
states entering the first adapted layer, and the attention mask) is cached once per
(model, n, max_length, num_blocks), and the LoRA methods run on a model made of the
encoder's own top layers (:class:`TopEncoder`); the run checks once that it gives the
full model's logits. SISA trains every weight, so it runs the full model on token ids.

Deletion: ``s3t_delete_s`` is ``S3TShard.delete`` of one sample (deactivation, nothing
trained) plus building the new serving model; ``sisa_retrain_s`` the time to retrain that
shard by full fine-tuning (one slice per shard: from the backbone), and their ratio.

Memory: a fresh process per B (``--memory-child``) runs what a shard actor runs: load the
backbone, train the shard's B orders (tokens, the full model), serve a prediction. Its peak
RSS is read from outside the model code (the child's VmHWM, and the parent polling the
child's RSS with psutil every 5 ms; the larger is reported); the reference is a process that loads the same base
and runs the same forward passes with no adapter (``B=0``): ``ratio`` = peak(B) / (peak(base)
+ bytes of B orders' adapters and heads).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ray_unlearn.platform.core.config import ModelConfig, TrainingConfig
from ray_unlearn.platform.core.data.text import make_bbcnews
from ray_unlearn.platform.core.models import build_model, text_encoder_of
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
SELECTION_SEED = 0
METHODS = ["frozen_head", "full_lora", "s3t", "sisa_full"]


def _settings(quick: bool) -> dict:
    if quick:
        return dict(n=400, max_length=32, shards=2, slices=2, budgets=[1, 2], num_blocks=2,
                    seeds=[0], public_fraction=0.1, batch_size=16, memory_rows=32)  # fmt: skip
    return dict(n=None, max_length=32, shards=2, slices=3, budgets=[1, 2, 3], num_blocks=3,
                seeds=[0, 1, 2], public_fraction=0.1, batch_size=16, memory_rows=96)  # fmt: skip


def _grids(quick: bool) -> dict:
    """Candidate settings, each scored on the selection seed's validation split.

    head: (epochs, lr) of a head on the frozen encoder's pooled output (cheap: the pooled
    rows are cached), for frozen_head (all training rows) and for the public backbone's
    head (public rows); lora: (epochs, lr, rank) shared by full_lora and S3T (each picks
    its own best); sisa: (epochs, lr) of full fine-tuning."""
    if quick:
        return {
            "head": [(e, lr) for e in (5, 20) for lr in (3e-3, 1e-2)],
            "lora": [(2, 5e-3, 4), (4, 5e-3, 8)],
            "sisa": [(1, 5e-5)],
        }
    return {
        "head": [(e, lr) for e in (5, 20, 50) for lr in (1e-3, 3e-3, 1e-2, 3e-2)],
        "lora": [(2, 5e-3, 4), (4, 5e-3, 4), (4, 1e-2, 8)],
        "sisa": [(1, 5e-5)],
    }


# -- data and the cached frozen layers -----------------------------------------------------


def _mcfg(s: dict, **extra) -> ModelConfig:
    return ModelConfig(
        component="hf_encoder", args={"model": s["model"], "max_length": s["max_length"], **extra}
    )


def load_texts(s: dict) -> tuple[list[str], np.ndarray]:
    table = make_bbcnews()
    labels = table.column("label").to_numpy()
    texts = table.column("text").to_pylist()
    if s["n"] is not None:  # a random subset, fixed
        pick = np.random.default_rng(1234).permutation(len(texts))[: s["n"]]
        texts, labels = [texts[i] for i in pick], labels[pick]
    return texts, np.asarray(labels, dtype=np.int64)


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.encoder.get_submodule(model._layers)


class TopEncoder(nn.Module):
    """The encoder's top ``k`` layers, mean pooling and a linear head.

    Input rows (B, T*H + T): the hidden states entering the first of those layers (B, T, H),
    flattened, then the attention mask (B, T) as 0/1. For the frozen layers below, this is
    the full model (checked by :func:`check_top`). Its blocks are ``layers.0..k-1``."""

    def __init__(self, full: nn.Module, k: int):
        super().__init__()
        self.config = full.encoder.config
        self.layers = copy.deepcopy(nn.ModuleList(list(_layers(full))[-k:]))
        self.head = copy.deepcopy(full.head)
        self.hidden = int(self.config.hidden_size)

    def default_blocks(self) -> list[str]:
        return [f"layers.{i}" for i in range(len(self.layers))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        B, H = x.shape[0], self.hidden
        T = x.shape[1] // (H + 1)
        h = x[:, : T * H].reshape(B, T, H)  # (B, T, H)
        mask = x[:, T * H :]  # (B, T) 0/1
        attn = create_bidirectional_mask(
            config=self.config, inputs_embeds=h, attention_mask=mask.long()
        )
        for layer in self.layers:
            h = layer(h, attn)
        m = mask.unsqueeze(-1)  # (B, T, 1)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0))


def encode_cache(s: dict, texts: list[str], out: Path) -> dict[str, np.ndarray]:
    """Token ids, the cached input of the top ``num_blocks`` layers and the frozen encoder's
    pooled output of every text (computed once, stored under ``out/cache``)."""
    key = hashlib.sha256(
        repr((s["model"], s["n"], s["max_length"], s["num_blocks"], len(texts))).encode()
    ).hexdigest()[:12]
    path = out / "cache" / f"encoded-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    ids = text_encoder_of(_mcfg(s))(texts)  # (n, T) float32 token ids
    full = build_model(_mcfg(s), (s["max_length"],), NUM_CLASSES).eval()
    first = len(_layers(full)) - s["num_blocks"]  # index of the first adapted layer
    prefix, pooled = [], []
    with torch.no_grad():
        for i in range(0, len(ids), 64):
            x = torch.from_numpy(ids[i : i + 64]).long()
            mask = x != full.pad_id
            o = full.encoder(input_ids=x, attention_mask=mask.long(), output_hidden_states=True)
            h_in = o.hidden_states[first]  # (b, T, H): entering layer `first`
            prefix.append(torch.cat([h_in.flatten(1), mask.float()], 1).numpy())
            m = mask.unsqueeze(-1).float()
            pooled.append(((o.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1.0)).numpy())
    enc = {"ids": ids, "prefix": np.concatenate(prefix), "pooled": np.concatenate(pooled)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **enc)
    return enc


def check_top(s: dict, enc: dict) -> float:
    """Max |logit difference| between the full model and :class:`TopEncoder` on 8 rows
    (same head); raises when above 1e-4 (the cache would not be the model)."""
    full = build_model(_mcfg(s), (s["max_length"],), NUM_CLASSES).eval()
    top = TopEncoder(full, s["num_blocks"]).eval()
    with torch.no_grad():
        a = full(torch.from_numpy(enc["ids"][:8]))
        b = top(torch.from_numpy(enc["prefix"][:8]))
    diff = float((a - b).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"the cached top layers differ from the full model by {diff}")
    return diff


# -- methods -------------------------------------------------------------------------------


def _data(x: np.ndarray, y: np.ndarray, rows, shard=0, slices=None, num_slices=1) -> ShardData:
    rows = np.asarray(rows, dtype=np.int64)
    return ShardData(
        shard=shard,
        sample_ids=rows,
        slices=np.zeros(len(rows), np.int32) if slices is None else np.asarray(slices, np.int32),
        features=torch.from_numpy(np.ascontiguousarray(x[rows])),
        labels=torch.from_numpy(y[rows]),
        num_slices=num_slices,
    )


def _acc(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def _probs(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return predict_proba(model, torch.from_numpy(np.ascontiguousarray(x)), 64).numpy()


class _Head(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def train_head(pooled, y, rows, epochs: int, lr: float, seed: int, init=None) -> nn.Module:
    """A head on the frozen encoder's pooled output (the frozen model's only trainable part)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _Head(pooled.shape[1])
    if init is not None:
        model.head.load_state_dict(init.state_dict())
    train_stage(
        model, _data(pooled, y, rows), 0, TrainingConfig(epochs=epochs, batch_size=16, lr=lr), seed
    )
    return model.eval()


class Split:
    """One seed's rows: train / val / test, public / private, shards and slices."""

    def __init__(self, seed: int, s: dict, n: int):
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        n_tr, n_va = int(0.7 * n), int(0.15 * n)
        self.tr, self.va, self.te = perm[:n_tr], perm[n_tr : n_tr + n_va], perm[n_tr + n_va :]
        n_pub = max(16, int(s["public_fraction"] * n_tr))
        self.public, self.private = self.tr[:n_pub], self.tr[n_pub:]
        shard_of = rng.integers(0, s["shards"], len(self.private))
        slice_of = rng.integers(0, s["slices"], len(self.private))
        self.shards = [np.sort(self.private[shard_of == k]) for k in range(s["shards"])]
        self.slices = [
            slice_of[shard_of == k][np.argsort(self.private[shard_of == k])]
            for k in range(s["shards"])
        ]


class Bench:
    """Every method on one seed's split, on the cached encodings."""

    def __init__(self, seed: int, s: dict, enc: dict, y: np.ndarray, full: nn.Module):
        self.seed, self.s, self.enc, self.y = seed, s, enc, y
        self.sp = Split(seed, s, len(y))
        self.full = full  # the loaded encoder classifier (frozen), template of every model

    def score(self, probs_va: np.ndarray, probs_te: np.ndarray | None) -> dict:
        out = {"val": _acc(probs_va, self.y[self.sp.va])}
        if probs_te is not None:
            out["test"] = _acc(probs_te, self.y[self.sp.te])
        return out

    def head_only(self, rows, epochs: int, lr: float) -> nn.Module:
        return train_head(self.enc["pooled"], self.y, rows, epochs, lr, self.seed)

    def frozen_head(self, hs, test: bool) -> dict:
        h = self.head_only(self.sp.tr, *hs)
        pooled = self.enc["pooled"]
        return self.score(
            _probs(h, pooled[self.sp.va]), _probs(h, pooled[self.sp.te]) if test else None
        )

    def backbone(self, bs) -> TopEncoder:
        """The public backbone: the top layers (frozen) and the head trained on the public
        rows (the bottom layers are in the cache)."""
        top = TopEncoder(self.full, self.s["num_blocks"])
        top.head.load_state_dict(self.head_only(self.sp.public, *bs).head.state_dict())
        for p in top.parameters():
            p.requires_grad_(False)
        return top.eval()

    def _cfg(self, ls, budget: int = 1) -> S3TConfig:
        epochs, lr, rank = ls
        return S3TConfig(
            budget=budget, num_blocks=self.s["num_blocks"], lora_rank=rank,
            lora_alpha=2.0 * rank, public_fraction=self.s["public_fraction"],
            epochs=epochs, lr=lr, batch_size=self.s["batch_size"],
        )  # fmt: skip

    def _eval_top(self, models, test: bool) -> dict:
        x = self.enc["prefix"]
        va = np.mean([_probs(m, x[self.sp.va]) for m in models], axis=0)
        te = np.mean([_probs(m, x[self.sp.te]) for m in models], axis=0) if test else None
        return self.score(va, te)

    def lora(self, bb: TopEncoder, ls, rows_list, test: bool) -> dict:
        """One LoRA stage adapting every block, per row set; mean of their probabilities."""
        cfg, x = self._cfg(ls), self.enc["prefix"]
        blocks = check_s3t(cfg, bb, 1)
        models, t0 = [], time.perf_counter()
        for k, rows in enumerate(rows_list):
            (snap,) = train_order(bb, _data(x, self.y, rows, k), (0,), 90 + k, cfg,
                                  seed=self.seed, blocks=blocks)  # fmt: skip
            models.append(model_for(bb, [snap], 1))
        return {**self._eval_top(models, test), "train_s": time.perf_counter() - t0}

    def s3t(self, bb: TopEncoder, ls, test: bool, budget: int = 1) -> tuple[dict, dict]:
        cfg, x, R = self._cfg(ls, budget), self.enc["prefix"], self.s["slices"]
        blocks = check_s3t(cfg, bb, R)
        shards, t0 = {}, time.perf_counter()
        for k, rows in enumerate(self.sp.shards):
            data = _data(x, self.y, rows, k, self.sp.slices[k], R)
            shards[k] = S3TShard.train(bb, data, cfg, seed=self.seed, blocks=blocks)
        out = {**self._eval_top([sh.live_model() for sh in shards.values()], test)}
        out["train_s"] = time.perf_counter() - t0
        return out, shards

    def sisa(self, bs, ss, test: bool) -> dict:
        """Per shard, every weight of the full model (token ids), from the public backbone."""
        epochs, lr = ss
        base = copy.deepcopy(self.full)
        base.head.load_state_dict(self.head_only(self.sp.public, *bs).head.state_dict())
        cfg = S3TConfig(epochs=epochs, pretrain_lr=lr, batch_size=self.s["batch_size"])
        ids, models, secs = self.enc["ids"], [], []
        for k, rows in enumerate(self.sp.shards):
            t0 = time.perf_counter()
            models.append(full_finetune(base, _data(ids, self.y, rows, k), cfg, self.seed))
            secs.append(time.perf_counter() - t0)
        va = np.mean([_probs(m, ids[self.sp.va]) for m in models], axis=0)
        te = np.mean([_probs(m, ids[self.sp.te]) for m in models], axis=0) if test else None
        return {**self.score(va, te), "train_s": sum(secs), "shard_train_s": secs}


def deletion_times(shards: dict) -> list[float]:
    """Per shard: delete its first sample (deactivation) and build the serving model."""
    out = []
    for sh in shards.values():
        t0 = time.perf_counter()
        sh.delete(sh.sample_ids[:1])
        sh.live_model()  # None once the shard is dead
        out.append(time.perf_counter() - t0)
    return out


# -- parts ---------------------------------------------------------------------------------


def _best(entries: list[dict], key: str = "val") -> dict:
    """The first entry with the highest validation accuracy (grids list cheaper first)."""
    return max(entries, key=lambda e: e[key])


def select(s: dict, grids: dict, enc: dict, y: np.ndarray, full: nn.Module) -> dict:
    """Every setting, from its grid, by validation accuracy on the selection seed."""
    b = Bench(SELECTION_SEED, s, enc, y, full)
    pooled, out = enc["pooled"], {"seed": SELECTION_SEED, "grids": grids}
    out["frozen_head"] = [{"setting": hs, **b.frozen_head(hs, False)} for hs in grids["head"]]
    out["backbone_head"] = [
        {"setting": hs, **b.score(_probs(b.head_only(b.sp.public, *hs), pooled[b.sp.va]), None)}
        for hs in grids["head"]
    ]
    bs = _best(out["backbone_head"])["setting"]
    out["full_lora"], out["s3t"] = [], []
    for ls in grids["lora"]:
        out["full_lora"].append(
            {"setting": ls, **b.lora(b.backbone(bs), ls, [b.sp.private], False)}
        )
        out["s3t"].append({"setting": ls, **b.s3t(b.backbone(bs), ls, False)[0]})
    # where S3T's gap comes from, at its chosen setting: sharding alone (per-shard LoRA in
    # one stage) against full_lora at the same setting, then the slices and stages
    ls = _best(out["s3t"])["setting"]
    out["lora_shards"] = [{"setting": ls, **b.lora(b.backbone(bs), ls, b.sp.shards, False)}]
    if len(grids["sisa"]) > 1:
        out["sisa_full"] = [{"setting": ss, **b.sisa(bs, ss, False)} for ss in grids["sisa"]]
    else:  # one candidate (full fine-tuning is the costliest method): fixed, not chosen
        out["sisa_full"] = [{"setting": grids["sisa"][0], "val": 0.0, "fixed": True}]
    out["chosen"] = {
        k: _best(out[k])["setting"]
        for k in ("frozen_head", "backbone_head", "full_lora", "s3t", "sisa_full")
    }
    return out


def report_seed(seed: int, s: dict, chosen: dict, enc, y, full) -> dict:
    """Validation and test accuracy of every method with the chosen settings; deletion."""
    b = Bench(seed, s, enc, y, full)
    bs = chosen["backbone_head"]
    out = {"seed": seed, "rows": {k: len(getattr(b.sp, k)) for k in ("tr", "va", "te", "public")}}
    out["frozen_head"] = b.frozen_head(chosen["frozen_head"], True)
    out["full_lora"] = b.lora(b.backbone(bs), chosen["full_lora"], [b.sp.private], True)
    out["s3t"], shards = b.s3t(b.backbone(bs), chosen["s3t"], True)
    out["s3t_delete_s"] = deletion_times(shards)
    # after one deletion per shard (B = 1: each shard serves a shorter prefix; a dead shard
    # leaves the ensemble, as in the platform; all dead: the public backbone alone)
    live = [sh.live_model() for sh in shards.values() if not sh.dead]
    out["s3t_after_delete"] = b._eval_top(live or [next(iter(shards.values())).backbone], True)
    out["s3t_after_delete"]["prefixes"] = [sh.prefix for sh in shards.values()]
    out["sisa_full"] = b.sisa(bs, chosen["sisa_full"], True)
    return out


def _run_children(cmds: dict[int, list[str]]) -> dict[int, dict]:
    """Run every command at once (each is its own process: its RSS is its own); each
    prints a JSON document as its last stdout line; add the peak RSS polled from here."""
    import psutil

    with open(os.devnull, "w") as err:
        procs = {
            k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=err, text=True)
            for k, c in cmds.items()
        }
        peak = dict.fromkeys(procs, 0)
        while any(p.poll() is None for p in procs.values()):
            for k, p in procs.items():
                try:
                    peak[k] = max(peak[k], psutil.Process(p.pid).memory_info().rss)
                except psutil.NoSuchProcess:  # finished since poll()
                    pass
            time.sleep(0.005)
        texts = {k: p.stdout.read() for k, p in procs.items()}
    out = {}
    for k, p in procs.items():
        p.stdout.close()
        if p.returncode != 0:
            raise RuntimeError(f"memory child B={k} failed with exit status {p.returncode}")
        out[k] = {**json.loads(texts[k].strip().splitlines()[-1]), "polled_peak_rss": peak[k]}
    return out


def memory(s: dict, quick: bool) -> dict:
    """Peak RSS of a shard process per B (a fresh process each, run side by side), and of
    the base alone."""
    me = [sys.executable, str(Path(__file__).resolve())]
    args = ["--out", "-", "--model", s["model"]] + (["--quick"] if quick else [])
    runs = _run_children({b: [*me, *args, "--memory-child", str(b)] for b in [0, *s["budgets"]]})
    base = runs.pop(0)
    out = {"base_only": base}
    for b, r in runs.items():
        peak = max(r["hwm_rss"], r["polled_peak_rss"])
        ref = max(base["hwm_rss"], base["polled_peak_rss"]) + r["own_bytes"]
        out[f"B={b}"] = {
            **r,
            "peak_rss": peak,
            "reference_rss": ref,
            "ratio_to_base_plus_adapters": peak / ref,
            "ratio_to_B1": peak / max(runs[1]["hwm_rss"], runs[1]["polled_peak_rss"]),
            # what one copy of the backbone per order would add (arithmetic, not measured)
            "copy_per_order_estimate": peak + (b - 1) * r["base_bytes"],
        }
    return out


def memory_child(s: dict, budget: int) -> None:
    """What a shard actor does with B = ``budget`` orders (0: the base alone, the same
    forward passes, no adapter); prints one JSON line with its own peak RSS."""
    import psutil

    t0, me = time.perf_counter(), psutil.Process()
    rss = {"import": me.memory_info().rss}
    torch.set_num_threads(1)
    texts, y = load_texts(s)
    n_pub, n = 16, s["memory_rows"]
    ids = text_encoder_of(_mcfg(s))(texts[: n_pub + n])
    R = s["slices"]
    cfg = S3TConfig(budget=max(budget, 1), num_blocks=s["num_blocks"], lora_rank=8,
                    lora_alpha=16, pretrain_epochs=1, pretrain_lr=1e-2, epochs=1, lr=5e-3,
                    batch_size=s["batch_size"])  # fmt: skip
    rows = np.arange(n_pub, n_pub + n)
    public = _data(ids, y, np.arange(n_pub), 0x7FFE)
    backbone = pretrain_backbone(_mcfg(s), (s["max_length"],), NUM_CLASSES, public, cfg, 0)
    rss["load"] = me.memory_info().rss
    data = _data(ids, y, rows, 0, np.arange(n) % R, R)
    own = 0
    if budget == 0:
        for _ in range(cfg.epochs):  # the training rows' forward passes, then serving
            _probs(backbone, ids[rows])
        _probs(backbone, ids[rows])
    else:
        blocks = check_s3t(cfg, backbone, R)
        shard = S3TShard.train(backbone, data, cfg, seed=0, blocks=blocks)
        shard.predict_proba(ids[rows])
        own = sum(t.nbytes for o in shard.snapshots for st in o for t in st.tensors().values())
    base_bytes = sum(p.nbytes for n_, p in backbone.named_parameters() if ".lora_" not in n_)
    rss["end"] = me.memory_info().rss
    print(json.dumps({
        "budget": budget, "rss": rss, "own_bytes": own, "base_bytes": base_bytes,
        "hwm_rss": _own_peak_rss(), "seconds": time.perf_counter() - t0,
    }))  # fmt: skip


def _own_peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, the high-water mark of its own address
    space. (ru_maxrss would not do: Linux carries it over from the parent across fork and
    exec, so a child of a big parent reports the parent's peak.)"""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere: best effort


# -- merge, plot, table --------------------------------------------------------------------


def _stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values)), "per_seed": values}


def merge(out: Path, s: dict, quick: bool) -> dict:
    """s3t_transformer.json from selection.json, runs/seed_*.json and memory.json."""
    sel = json.loads((out / "selection.json").read_text())
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("seed_*.json"))]
    if not runs:
        raise SystemExit(f"no runs under {out / 'runs'}: run --part report first")
    mem_path = out / "memory.json"
    mem = json.loads(mem_path.read_text()) if mem_path.is_file() else None
    shown = [*METHODS, "s3t_after_delete"]
    acc = {m: {k: _stats([r[m][k] for r in runs]) for k in ("val", "test")} for m in shown}
    gap = [r["full_lora"]["test"] - r["s3t"]["test"] for r in runs]
    dels = [t for r in runs for t in r["s3t_delete_s"]]
    retrain = [t for r in runs for t in r["sisa_full"]["shard_train_s"]]
    doc = {
        "quick": quick,
        "settings": s,
        "seeds": [r["seed"] for r in runs],
        "selection": sel,
        "chosen": sel["chosen"],
        "accuracy": acc,
        "s3t_vs_full_lora": {
            "test_gap_points": _stats([100 * g for g in gap]),
            "target_points": 2.0,
            "met": bool(100 * np.mean(gap) <= 2.0),
        },
        "gap_decomposition_val_seed0": {
            "setting": sel["lora_shards"][0]["setting"],
            "full_lora": next(
                e["val"]
                for e in sel["full_lora"]
                if e["setting"] == sel["lora_shards"][0]["setting"]
            ),
            "lora_shards": sel["lora_shards"][0]["val"],
            "s3t": next(
                e["val"] for e in sel["s3t"] if e["setting"] == sel["lora_shards"][0]["setting"]
            ),
        },
        "deletion": {
            "s3t_delete_s": _stats(dels),
            "sisa_retrain_s": _stats(retrain),
            "speedup": float(np.median(retrain) / np.median(dels)),
            "target_speedup": 1000,
            "met": bool(np.median(retrain) / np.median(dels) >= 1000),
        },
        "memory": mem,
        "runs": runs,
    }
    if mem is not None:
        ratios = [v["ratio_to_base_plus_adapters"] for k, v in mem.items() if k.startswith("B=")]
        doc["memory_target"] = {"ratio": 1.2, "max_ratio": max(ratios), "met": max(ratios) < 1.2}
    (out / "s3t_transformer.json").write_text(json.dumps(doc, indent=2))
    plot(doc, out / "s3t_transformer.png")
    return doc


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    names = [*METHODS, "s3t_after_delete"]
    acc = doc["accuracy"]
    x = np.arange(len(names))
    for off, split in ((-0.18, "val"), (0.18, "test")):
        m = [acc[n][split]["mean"] for n in names]
        sd = [acc[n][split]["sd"] for n in names]
        ax[0].bar(x + off, m, 0.36, yerr=sd, label=split, capsize=3)
        for i, n in enumerate(names):
            ax[0].plot([x[i] + off] * len(acc[n][split]["per_seed"]), acc[n][split]["per_seed"],
                       "k.", ms=3)  # fmt: skip
    lo = min(min(acc[n]["test"]["per_seed"] + acc[n]["val"]["per_seed"]) for n in names)
    ax[0].set(xticks=x, ylim=(max(0.0, lo - 0.05), 1.0), ylabel="accuracy",
              title=f"bbcnews, {len(doc['seeds'])} seed(s)")  # fmt: skip
    ax[0].set_xticklabels(names, rotation=20, fontsize=8)
    ax[0].legend(fontsize=8)
    d = doc["deletion"]
    ax[1].bar(["S3T deactivate", "SISA retrain"],
              [d["s3t_delete_s"]["mean"], d["sisa_retrain_s"]["mean"]], color=["C2", "C3"])  # fmt: skip
    ax[1].set(yscale="log", ylabel="seconds per deletion (one shard)",
              title=f"deletion: x{d['speedup']:.0f} faster")  # fmt: skip
    mem = doc.get("memory")
    if mem:
        bs = [k for k in mem if k.startswith("B=")]
        peak = [mem[k]["peak_rss"] / 2**20 for k in bs]
        ref = [mem[k]["reference_rss"] / 2**20 for k in bs]
        xb = np.arange(len(bs))
        ax[2].bar(xb - 0.2, peak, 0.4, label="peak RSS (measured)")
        ax[2].bar(xb + 0.2, ref, 0.4, label="base process + adapters")
        ax[2].plot(xb, [1.2 * r for r in ref], "r_", ms=20, label="1.2x target")
        ax[2].set(xticks=xb, ylabel="MiB", title="memory per shard process")
        ax[2].set_xticklabels(bs)
        ax[2].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(doc: dict) -> None:
    acc = doc["accuracy"]
    print(f"{'method':<17} {'val':>13} {'test':>13}")
    for k, v in acc.items():
        print(f"{k:<17} {v['val']['mean']:.3f}+-{v['val']['sd']:.3f} "
              f"{v['test']['mean']:.3f}+-{v['test']['sd']:.3f}")  # fmt: skip
    g = doc["s3t_vs_full_lora"]["test_gap_points"]
    print(f"full_lora - s3t (test): {g['mean']:.1f} +- {g['sd']:.1f} points (target <= 2)")
    gd = doc["gap_decomposition_val_seed0"]
    print(f"validation, seed 0, setting {gd['setting']}: full_lora {gd['full_lora']:.3f}, "
          f"lora per shard {gd['lora_shards']:.3f}, s3t {gd['s3t']:.3f}")  # fmt: skip
    d = doc["deletion"]
    print(f"deletion: s3t {d['s3t_delete_s']['mean'] * 1e3:.2f} ms, sisa retrain "
          f"{d['sisa_retrain_s']['mean']:.1f} s: x{d['speedup']:.0f} (target 1000)")  # fmt: skip
    for k, m in (doc.get("memory") or {}).items():
        if k.startswith("B="):
            print(f"memory {k}: peak {m['peak_rss'] / 2**20:.0f} MiB, base+adapters "
                  f"{m['reference_rss'] / 2**20:.0f} MiB: x{m['ratio_to_base_plus_adapters']:.3f}"
                  f" (x{m['ratio_to_B1']:.3f} of B=1)")  # fmt: skip
    print("chosen on validation (seed 0):", json.dumps(doc["chosen"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--quick", action="store_true", help="small settings (about a minute)")
    ap.add_argument("--model", default="all-minilm-l6-v2", help="hf_encoder model (or a dir)")
    ap.add_argument("--n", type=int, default=None, help="use only n articles")
    ap.add_argument("--part", default="all", choices=["all", "select", "report", "memory", "merge"])
    ap.add_argument("--seeds", default=None, help="report seeds, comma-separated")
    ap.add_argument(
        "--threads", type=int, default=int(os.environ.get("RAY_UNLEARN_BENCH_THREADS", "1"))
    )
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    s = {**_settings(args.quick), "model": args.model}
    if args.n is not None:
        s["n"] = args.n
    if args.seeds is not None:
        s["seeds"] = [int(v) for v in args.seeds.split(",")]
    if args.memory_child is not None:
        memory_child(s, args.memory_child)
        return 0
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if args.part in ("all", "select", "report"):
        t0 = time.perf_counter()
        texts, y = load_texts(s)
        enc = encode_cache(s, texts, out)
        print(f"encoded {len(y)} texts in {time.perf_counter() - t0:.1f} s; "
              f"top layers = full model within {check_top(s, enc):.1e}", flush=True)  # fmt: skip
        full = build_model(_mcfg(s), (s["max_length"],), NUM_CLASSES).eval()
    if args.part in ("all", "select"):
        t0 = time.perf_counter()
        sel = select(s, _grids(args.quick), enc, y, full)
        sel["seconds"] = time.perf_counter() - t0
        (out / "selection.json").write_text(json.dumps(sel, indent=2))
        print(f"selection: {json.dumps(sel['chosen'])} ({sel['seconds']:.0f} s)", flush=True)
    if args.part in ("all", "report"):
        chosen = json.loads((out / "selection.json").read_text())["chosen"]
        for seed in s["seeds"]:
            t0 = time.perf_counter()
            r = report_seed(seed, s, chosen, enc, y, full)
            r["seconds"] = time.perf_counter() - t0
            (out / "runs" / f"seed_{seed}.json").write_text(json.dumps(r, indent=2))
            print(f"seed {seed}: " + ", ".join(
                f"{m} {r[m]['test']:.3f}" for m in [*METHODS, "s3t_after_delete"]
            ) + f" ({r['seconds']:.0f} s)", flush=True)  # fmt: skip
    if args.part in ("all", "memory"):
        (out / "memory.json").write_text(json.dumps(memory(s, args.quick), indent=2))
    if args.part in ("all", "merge"):
        table(merge(out, s, args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
