"""How much a model memorized each training sample: the exact estimator and cheap proxies.

* **Exact (Feldman's estimator).** Train M models, each on a random subset (a fraction
  ``keep`` of the training rows, drawn per model from a seeded stream). For sample i,
  ``mem_i = mean correctness on i of models whose subset held i - mean correctness on i of
  models whose subset did not``. :func:`subset_model_correctness` trains one model and
  returns its membership mask and correctness vector; the Ray layer
  (``ray_unlearn.train.memorization``) fans the M models out as parallel tasks, and
  :func:`exact_memorization` runs them one by one in process.
* **Proxies recorded while training one model** (:func:`train_with_proxies`): after every
  epoch the model's outputs on the training rows are read once (one forward pass, no
  gradient) and running means over the epochs are kept of: true-class ``confidence``,
  ``max_confidence`` (of the top class), ``entropy`` of the output, and ``binary_accuracy``
  (1 if the top class is right). Memorized samples are learnt late and reluctantly, so a
  *low* mean confidence, max-confidence or accuracy and a *high* mean entropy point to high
  memorization; :data:`DIRECTION` says which way each score points, and
  :func:`as_memorization` turns any score into "higher = more memorized". This is an
  epoch-end pass, not ``training.run_steps``'s per-step ``on_step`` hook: every row is
  read once per epoch under the same weights (the hook sees a row only in its own batch,
  under weights that differ from batch to batch).
* **Holdout retraining** (:func:`holdout_kl`): fine-tune a copy of the trained model on
  held-out rows for a few epochs; a sample the model had memorized moves more: the
  symmetric KL between the two models' outputs on it is its score (high = memorized).
* **Proxies of a SISA shard** (:func:`snapshot_proxies`): a shard keeps a checkpoint after
  every slice, the record of its training; a row's four proxies are the running means over
  the checkpoints that had trained on it (slice r's rows: checkpoints r..R-1), R forward
  passes and no extra training. The ``rum`` strategy reads these when a deletion executes.

Scores are stored per sample with the run (:func:`save_scores`, one Parquet file per
score under the run's ``reports/memorization``; :func:`compute_run_scores` computes and
stores any of them for a run's training rows).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from ray_unlearn.platform.core.config import ModelConfig
from ray_unlearn.platform.core.models import build_model
from ray_unlearn.platform.core.training import derive_seed, run_steps, torch_threads

if TYPE_CHECKING:
    from ray_unlearn.platform.core.run import RunContext

PROXIES = ("confidence", "max_confidence", "entropy", "binary_accuracy")
SCORES = ("exact", *PROXIES, "holdout_kl")
# +1: a higher score means more memorized; -1: a lower score means more memorized
DIRECTION = {
    "exact": 1,
    "confidence": -1,
    "max_confidence": -1,
    "entropy": 1,
    "binary_accuracy": -1,
    "holdout_kl": 1,
}
_SUBSET, _INIT, _BATCH = 0x4D454D53, 0x4D454D49, 0x4D454D42  # "MEMS", "MEMI", "MEMB"
_HOLD = 0x484F4C44  # "HOLD"
_SPLIT = 0x53504C54  # "SPLT": the random halves of split_half_reliability


@dataclass(frozen=True)
class FitSpec:
    """How every model of the estimator (and the proxies' model) is trained."""

    model: ModelConfig
    feature_shape: tuple[int, ...]
    num_classes: int
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3

    @classmethod
    def for_run(cls, ctx: RunContext) -> FitSpec:
        """The run's model, trained with its epochs, batch size and learning rate."""
        t = ctx.config.training
        return cls(
            ctx.config.model, ctx.feature_shape, ctx.num_classes, t.epochs, t.batch_size, t.lr
        )


def _check_name(name: str) -> None:
    if name not in DIRECTION:
        raise ValueError(f"unknown score {name!r}; known: {', '.join(DIRECTION)}")


def as_memorization(name: str, score: np.ndarray) -> np.ndarray:
    """Any score oriented so that higher means more memorized."""
    _check_name(name)
    return DIRECTION[name] * np.asarray(score, dtype=np.float64)


def _new_model(spec: FitSpec, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec.model, spec.feature_shape, spec.num_classes)


def fit(
    spec: FitSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    *,
    model: nn.Module | None = None,
    epochs: int | None = None,
    on_epoch: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Adam on (x, y) for ``epochs`` passes with seeded batches (a new model if none)."""
    model = model if model is not None else _new_model(spec, derive_seed(seed, _INIT))
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    g = torch.Generator().manual_seed(derive_seed(seed, _BATCH))
    n = len(y)
    for _ in range(spec.epochs if epochs is None else epochs):
        run_steps(model, opt, x, y, torch.randperm(n, generator=g).split(spec.batch_size))
        model.eval()
        if on_epoch is not None:
            on_epoch(model)
    model.eval()
    return model


@torch.no_grad()
def probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.softmax(model(x), dim=1)


# -- the exact estimator ------------------------------------------------------------------------


def subset_mask(n: int, keep: float, seed: int, index: int) -> np.ndarray:
    """Model ``index``'s subset: each row kept with probability ``keep`` (seeded)."""
    return np.random.default_rng([seed, _SUBSET, index]).random(n) < keep


def subset_model_correctness(
    spec: FitSpec, x: np.ndarray, y: np.ndarray, keep: float, seed: int, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train model ``index`` on its subset; returns (in-subset mask, correct on each row).

    One torch thread (the estimator's parallelism is across models, not inside one)."""
    mask = subset_mask(len(y), keep, seed, index)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))
    with torch_threads(1):
        m = fit(spec, xt[mask], yt[mask], derive_seed(seed, index))
        correct = (probabilities(m, xt).argmax(1) == yt).numpy()
    return mask, correct


def memorization_from_runs(masks: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """(M, n) masks and correctness -> mem_i; NaN where no model (or every model) held i."""
    masks, correct = np.asarray(masks, bool), np.asarray(correct, np.float64)
    held, out = masks.sum(0), (~masks).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = (correct * masks).sum(0) / held
        b = (correct * ~masks).sum(0) / out
    mem = a - b
    mem[(held == 0) | (out == 0)] = np.nan
    return mem


def check_estimator(models: int, keep: float) -> None:
    if models < 2:
        raise ValueError(f"models must be >= 2 (got {models}): one run cannot compare")
    if not 0 < keep < 1:
        raise ValueError(f"keep must be in (0, 1), got {keep}")


def exact_memorization(
    spec: FitSpec, x: np.ndarray, y: np.ndarray, *, models: int, keep: float = 0.7, seed: int = 0
) -> np.ndarray:
    """Feldman's estimator, in process (see ``ray_unlearn.train.memorization`` for Ray)."""
    check_estimator(models, keep)
    runs = [subset_model_correctness(spec, x, y, keep, seed, i) for i in range(models)]
    return memorization_from_runs(np.stack([r[0] for r in runs]), np.stack([r[1] for r in runs]))


def split_half_reliability(
    masks: np.ndarray, correct: np.ndarray, *, splits: int = 20, seed: int = 0
) -> dict[str, float]:
    """How reproducible the estimator's ranking is with these M models.

    The M models are split at random into two disjoint halves of M // 2; each half gives its
    own estimate (:func:`memorization_from_runs`) and the two are compared by Spearman's
    rank correlation over the rows both define. ``mean`` / ``min`` / ``max``: over
    ``splits`` random partitions (one partition is luck-prone with few models).
    ``spearman_brown``: the mean corrected to the full M models, ``2r / (1 + r)`` (the
    classical prophecy for doubling a test's length; a rank correlation only approximates
    its assumptions, so the uncorrected ``mean`` is the figure to hold to a target). A
    partition where a half's estimate is constant has no correlation (NaN) and is skipped."""
    from scipy.stats import spearmanr

    masks, correct = np.asarray(masks, bool), np.asarray(correct)
    m = len(masks)
    if m < 4 or masks.shape != correct.shape:
        raise ValueError(
            f"split_half_reliability needs (M, n) masks and correctness of the same shape with "
            f"M >= 4 (two halves of >= 2 models); got {masks.shape} and {correct.shape}"
        )
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    rng = np.random.default_rng([seed, _SPLIT])
    rs = []
    for _ in range(splits):
        order = rng.permutation(m)
        a, b = order[: m // 2], order[m // 2 : 2 * (m // 2)]
        ea, eb = (
            memorization_from_runs(masks[a], correct[a]),
            memorization_from_runs(masks[b], correct[b]),
        )
        ok = ~(np.isnan(ea) | np.isnan(eb))
        r = spearmanr(ea[ok], eb[ok]).statistic if ok.sum() > 2 else np.nan
        rs.append(float(r))
    mean = float(np.nanmean(rs)) if not np.isnan(rs).all() else float("nan")
    return {
        "models": m,
        "mean": mean,
        "min": float(np.nanmin(rs)) if not np.isnan(mean) else mean,
        "max": float(np.nanmax(rs)) if not np.isnan(mean) else mean,
        "spearman_brown": 2 * mean / (1 + mean) if mean > -1 else float("nan"),
        "splits": splits,
    }


# -- proxies -------------------------------------------------------------------------------------


def proxy_scores(probs: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample confidence, max-confidence, entropy, binary accuracy of one output."""
    p = probs.clamp_min(1e-12)
    return {
        "confidence": p.gather(1, y[:, None])[:, 0].numpy(),
        "max_confidence": p.max(1).values.numpy(),
        "entropy": (-(p * p.log()).sum(1)).numpy(),
        "binary_accuracy": (p.argmax(1) == y).float().numpy(),
    }


def train_with_proxies(
    spec: FitSpec, x: np.ndarray, y: np.ndarray, seed: int
) -> tuple[nn.Module, dict[str, np.ndarray]]:
    """Train one model on every row, keeping running means of the proxies over its epochs."""
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))
    sums: dict[str, np.ndarray] = {}
    epochs = 0

    def record(model: nn.Module) -> None:
        nonlocal epochs
        for k, v in proxy_scores(probabilities(model, xt), yt).items():
            sums[k] = sums.get(k, 0.0) + v
        epochs += 1

    model = fit(spec, xt, yt, seed, on_epoch=record)
    return model, {k: v / max(epochs, 1) for k, v in sums.items()}


def snapshot_proxies(
    models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, slices: np.ndarray
) -> dict[str, np.ndarray]:
    """The four proxies of a SISA shard's rows, as running means over its stage checkpoints.

    ``models[s]`` is the checkpoint after stage s (trained on slices 0..s); a row of slice r
    is averaged over checkpoints r..R-1, the ones that had trained on it."""
    slices = np.asarray(slices)
    if len(slices) != len(y) or (len(slices) and slices.max() >= len(models)):
        raise ValueError(
            f"snapshot_proxies: {len(y)} rows with slices up to "
            f"{int(slices.max()) if len(slices) else None} need that many slice entries and "
            f"a checkpoint per stage; got {len(slices)} slices and {len(models)} checkpoints"
        )
    sums = {k: np.zeros(len(y)) for k in PROXIES}
    seen = np.zeros(len(y))
    for stage, m in enumerate(models):
        rows = np.flatnonzero(slices <= stage)
        if not len(rows):
            continue
        idx = torch.from_numpy(rows)
        for k, v in proxy_scores(probabilities(m, x[idx]), y[idx]).items():
            sums[k][rows] += v
        seen[rows] += 1
    return {k: v / np.maximum(seen, 1) for k, v in sums.items()}


def holdout_kl(
    spec: FitSpec,
    model: nn.Module,
    x: np.ndarray,
    holdout_x: np.ndarray,
    holdout_y: np.ndarray,
    *,
    epochs: int = 3,
    seed: int = 0,
) -> np.ndarray:
    """Symmetric KL, per row of ``x``, between ``model`` and a copy fine-tuned on held-out
    rows for ``epochs`` passes (the model itself is not changed)."""
    if not len(holdout_y):
        raise ValueError("holdout retraining needs held-out rows; got none")
    tuned = copy.deepcopy(model)
    fit(
        spec,
        torch.from_numpy(np.ascontiguousarray(holdout_x)),
        torch.from_numpy(holdout_y.astype(np.int64)),
        derive_seed(seed, _HOLD),
        model=tuned,
        epochs=epochs,
    )
    xt = torch.from_numpy(np.ascontiguousarray(x))
    p, q = probabilities(model, xt).clamp_min(1e-12), probabilities(tuned, xt).clamp_min(1e-12)
    return ((p * (p.log() - q.log())).sum(1) + (q * (q.log() - p.log())).sum(1)).numpy()


# -- stored with the run ---------------------------------------------------------------------------


def scores_path(ctx: RunContext, name: str) -> str:
    """Where the run keeps score ``name`` (relative to the storage root)."""
    _check_name(name)
    return f"{ctx.layout.reports}/memorization/{name}.parquet"


def save_scores(
    ctx: RunContext, name: str, sample_ids: np.ndarray, scores: np.ndarray, seconds: float
) -> str:
    """Store one score per sample with the run; the metadata keeps the score's direction
    (+1: higher = more memorized) and the seconds it cost."""
    sample_ids, scores = np.asarray(sample_ids, np.int64), np.asarray(scores, np.float64)
    if sample_ids.shape != scores.shape or sample_ids.ndim != 1:
        raise ValueError(
            f"save_scores({name!r}): one score per sample id, got shapes "
            f"{sample_ids.shape} and {scores.shape}"
        )
    rel = scores_path(ctx, name)
    meta = {"score": name, "direction": str(DIRECTION[name]), "seconds": str(seconds),
            "at": str(time.time())}  # fmt: skip
    table = pa.table({"sample_id": sample_ids, "score": scores}).replace_schema_metadata(meta)
    ctx.storage.write_table(rel, table)
    return rel


def load_scores(ctx: RunContext, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids, scores) of score ``name`` stored with the run."""
    rel = scores_path(ctx, name)
    if not ctx.storage.exists(rel):
        raise FileNotFoundError(
            f"run {ctx.run_id} has no stored {name!r} scores ({rel}): compute them with "
            f"`ray-unlearn scores --run {ctx.run_id} --score {name}` (from Python: "
            "ray_unlearn.platform.methods.rum.memorization.compute_run_scores)"
        )
    t = ctx.storage.read_table(rel)
    return t["sample_id"].to_numpy(), t["score"].to_numpy()


def scores_for(ctx: RunContext, name: str, sample_ids: np.ndarray) -> np.ndarray:
    """Stored score ``name`` of each of ``sample_ids`` (NaN where the run has none)."""
    ids, vals = load_scores(ctx, name)
    sample_ids = np.asarray(sample_ids, np.int64)
    out = np.full(len(sample_ids), np.nan)
    if len(ids):
        order = np.argsort(ids)
        ids, vals = ids[order], vals[order]
        pos = np.minimum(np.searchsorted(ids, sample_ids), len(ids) - 1)
        hit = ids[pos] == sample_ids
        out[hit] = vals[pos[hit]]
    return out


ExactRunner = Callable[..., np.ndarray]  # (spec, x, y, *, models, keep, seed) -> mem


def compute_run_scores(
    ctx: RunContext,
    names: Sequence[str] = SCORES,
    *,
    models: int = 32,
    keep: float = 0.7,
    holdout_epochs: int = 3,
    exact_runner: ExactRunner = exact_memorization,
) -> dict[str, float]:
    """Compute scores ``names`` for the run's training rows and store them with the run.

    Every model is the run's (``FitSpec.for_run``). The four proxies come from one model
    trained on every training row (:func:`train_with_proxies`); ``holdout_kl`` fine-tunes
    that model on the run's test rows (they are only read, the run's models are untouched);
    ``exact`` runs ``exact_runner`` (in process by default; the Ray layer passes its fan-out).
    Returns the seconds each score cost."""
    unknown = [n for n in names if n not in DIRECTION]
    if unknown or not names:
        raise ValueError(
            f"scores to compute: unknown {unknown} (or none); known: {', '.join(SCORES)}"
        )
    spec, seed = FitSpec.for_run(ctx), ctx.config.seed
    train = ctx.split_records("train")
    x, y = np.ascontiguousarray(train.features, np.float32), train.labels.astype(np.int64)
    cost: dict[str, float] = {}
    if "exact" in names:
        t0 = time.perf_counter()
        mem = exact_runner(spec, x, y, models=models, keep=keep, seed=seed)
        cost["exact"] = time.perf_counter() - t0
        save_scores(ctx, "exact", train.sample_ids, mem, cost["exact"])
    if any(n in names for n in (*PROXIES, "holdout_kl")):
        t0 = time.perf_counter()
        model, proxies = train_with_proxies(spec, x, y, seed)
        trained_s = time.perf_counter() - t0
        for k in PROXIES:
            if k in names:
                cost[k] = trained_s
                save_scores(ctx, k, train.sample_ids, proxies[k], trained_s)
        if "holdout_kl" in names:
            test = ctx.split_records("test")
            t0 = time.perf_counter()
            kl = holdout_kl(spec, model, x, np.ascontiguousarray(test.features, np.float32),
                            test.labels, epochs=holdout_epochs, seed=seed)  # fmt: skip
            cost["holdout_kl"] = time.perf_counter() - t0
            save_scores(ctx, "holdout_kl", train.sample_ids, kl, cost["holdout_kl"])
    return cost
