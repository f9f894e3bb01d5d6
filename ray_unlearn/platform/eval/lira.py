"""A per-example membership attack with shadow models: LiRA, and U-LiRA for unlearning.

**LiRA** (the likelihood-ratio attack of Carlini et al., 2022). Whether a model trained on
a row shows in the model's *confidence* on that row, ``log(p_y / (1 - p_y))`` (the
logit-scaled true-class probability: roughly Gaussian across training runs, unlike p_y
itself). How confident a model is differs a lot from row to row (an easy row is
confident whether trained on or not), so the attack calibrates *per row*: S shadow models
are trained, each on a seeded random half of the candidate rows
(:func:`membership_matrix`); for every row, one Gaussian is fitted to the confidences of
the shadows that trained on it ("in") and one to those of the shadows that did not
("out") (:func:`fit_lira`). The target model's confidence c on the row is then scored:

* online: ``log N(c; mu_in, s_in^2) - log N(c; mu_out, s_out^2)``, the log likelihood
  ratio (:func:`online_scores`);
* offline (no "in" shadows needed, so targets can be scored with shadows trained before
  the target's rows were known; :func:`fit_offline`): ``log Phi((c - mu_out) / s_out)``,
  the log of the one-sided test "c is above what models without the row give"
  (:func:`offline_scores`).

Higher scores mean "member". With few shadows per row the per-row variances are noisy;
``global_variance=True`` pools each side's variance over all rows (means stay per row).

**U-LiRA** (for unlearning). The question is whether a row that was trained on and then
*unlearned* can be told apart from one the model never saw. The "in" distribution comes
from shadows trained with the row and then unlearned by the method under test, the "out"
one from shadows retrained without it (:func:`fit_ulira`): shadow s forgets the rows of
``masks[s]``; its unlearned model's confidences on those rows are "in" samples, and its
retrained model's confidences on the same rows are "out" samples. The target pair is
scored the same way: the forget rows under the unlearned target (positives) against the
same rows under a target retrained without them (negatives). AUC 0.5 and TPR at low FPR
equal to that FPR mean the unlearning left no trace this attack can see.

**Reporting** (:func:`attack_metrics`): AUC and the TPR at 1% and 0.1% FPR, read from
scikit-learn's ROC curve, with the number of negatives: a 0.1% FPR needs at least 1000
negatives to allow even one false positive; below that the figure is the TPR at zero
false positives.

**Training the shadows** is the caller's: ``train_fn(member_mask) -> predict_fn``, where
``member_mask`` (n,) bool says which candidate rows the shadow trains on and
``predict_fn(x)`` returns its (n, classes) probabilities (or logits) on the candidate
rows. :class:`MLPShadowTrainer` is one such ``train_fn`` for the platform's models
(``models.build_model`` trained by ``training.train_shard``); ``ray_unlearn.train.shadow``
trains the S shadows as parallel Ray tasks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy.special import log_softmax, logsumexp
from scipy.stats import norm
from sklearn.metrics import auc, roc_curve

from ray_unlearn.platform.core.config import ModelConfig, TrainingConfig
from ray_unlearn.platform.core.models import build_model
from ray_unlearn.platform.core.training import ShardData, derive_seed, torch_threads, train_shard

# features of the candidate rows -> (n, classes) probabilities or logits
PredictFn = Callable[[Any], np.ndarray]
# (n,) bool mask of the candidate rows to train on -> the trained model's predict_fn
TrainFn = Callable[[np.ndarray], PredictFn]
Outputs = Literal["probs", "logits"]

_TINY = np.finfo(np.float64).tiny  # log(_TINY) = -708: the floor of a log-probability
_SHADOW_SEED = 0x53484457  # "SHDW": the stream of shadow model seeds


# -- confidence --------------------------------------------------------------------------------


def _check_outputs(out: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    out = np.asarray(out, dtype=np.float64)
    labels = np.asarray(labels)
    if out.ndim != 2 or out.shape[1] < 2:
        raise ValueError(f"{what} must be (n, classes) with classes >= 2; got shape {out.shape}")
    if labels.shape != (out.shape[0],):
        raise ValueError(f"labels must be ({out.shape[0]},) for {what} of shape {out.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or (
        len(labels) and (labels.min() < 0 or labels.max() >= out.shape[1])
    ):
        raise ValueError(f"labels must be integers in [0, {out.shape[1]}); got {labels[:5]}...")
    if not np.isfinite(out).all():
        raise ValueError(f"{what} must be finite; {int((~np.isfinite(out)).sum())} entries are not")
    return out, labels.astype(np.int64)


def confidence_from_probs(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n, classes) probabilities -> (n,) ``log p_y - log(sum of the other classes' p)``.

    The other classes are summed directly rather than as ``1 - p_y``: when p_y rounds to 1
    the others still carry the confidence (float64 holds them down to 1e-308). Exact zeros
    are floored at the smallest float64, so p_y = 0 or 1 give -708 or +708 instead of inf.
    """
    p, y = _check_outputs(probs, labels, "probabilities")
    # float32 softmax or averaged ensembles can overshoot by a few ulps; more is not a probability
    if (p < -1e-6).any() or (p > 1 + 1e-6).any():
        raise ValueError("probabilities must lie in [0, 1]; pass logits with outputs='logits'")
    p = np.clip(p, 0.0, 1.0)
    rows = np.arange(len(y))
    p_y = p[rows, y]
    rest = p.copy()
    rest[rows, y] = 0.0
    return np.log(np.maximum(p_y, _TINY)) - np.log(np.maximum(rest.sum(1), _TINY))


def confidence_from_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n, classes) logits -> (n,) ``z_y - logsumexp(z_c, c != y)``: the same quantity as
    :func:`confidence_from_probs`, exact for any finite logits."""
    z, y = _check_outputs(logits, labels, "logits")
    rows = np.arange(len(y))
    others = z.copy()
    others[rows, y] = -np.inf
    return z[rows, y] - logsumexp(others, axis=1)


def confidence(out: np.ndarray, labels: np.ndarray, outputs: Outputs = "probs") -> np.ndarray:
    if outputs == "probs":
        return confidence_from_probs(out, labels)
    if outputs == "logits":
        return confidence_from_logits(out, labels)
    raise ValueError(f"outputs must be 'probs' or 'logits', got {outputs!r}")


# -- shadow plan and shadow confidences ----------------------------------------------------------


def membership_matrix(n: int, shadows: int, seed: int = 0) -> np.ndarray:
    """(shadows, n) bool: shadow s trains on row i where True.

    Balanced per row: every row is in exactly ``shadows // 2`` shadows (odd counts: half of
    the rows, drawn at random, in one more), so every row has "in" and "out" shadows; each
    shadow holds about half of the rows. Seeded: the same (n, shadows, seed), the same plan.
    """
    if n < 1:
        raise ValueError(f"n (candidate rows) must be >= 1, got {n}")
    if shadows < 2:
        raise ValueError(f"shadows must be >= 2 (one with and one without each row), got {shadows}")
    rng = np.random.default_rng([seed, _SHADOW_SEED])
    k = shadows // 2 + (rng.random(n) < 0.5) * (shadows % 2)  # (n,) shadows holding row i
    rank = rng.random((shadows, n)).argsort(axis=0).argsort(axis=0)  # a random order per row
    return rank < k


def group_membership(groups: np.ndarray, shadows: int, seed: int = 0) -> np.ndarray:
    """(shadows, n) bool like :func:`membership_matrix`, drawn over *groups* of rows: every
    row of a group shares its group's membership. For unlearning, a group is an owner (one
    deletion request removes all of an owner's rows), so a shadow forgets whole owners.
    ``groups`` (n,) holds any hashable labels (owner ids); balanced per group."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) == 0:
        raise ValueError(f"groups must be a non-empty (n,) array; got shape {groups.shape}")
    uniq, inverse = np.unique(groups, return_inverse=True)  # (G,), (n,) index into uniq
    return membership_matrix(len(uniq), shadows, seed)[:, inverse.ravel()]


def ensemble_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(K, n, classes) logits of K members -> (n,) confidence (as :func:`confidence`) of
    their mean-probability ensemble, the ``mean_prob`` answer a served ensemble gives.

    The mean is taken in log space, ``log mean_k softmax(z_k)``, in float64: a log-probability
    vector is a valid logit vector, so :func:`confidence_from_logits` then gives
    ``log p_y - log(sum of the others)`` exactly, also where a float32 mean of
    probabilities would round p_y to 1. A (n, classes) array is one member.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2:
        z = z[None]
    if z.ndim != 3 or z.shape[0] < 1:
        raise ValueError(f"logits must be (members, n, classes); got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError(f"logits must be finite; {int((~np.isfinite(z)).sum())} entries are not")
    log_mean = logsumexp(log_softmax(z, axis=2), axis=0) - np.log(z.shape[0])  # (n, classes)
    return confidence_from_logits(log_mean, labels)


def shadow_confidence(
    train_fn: TrainFn, member_mask: np.ndarray, x: Any, y: np.ndarray, outputs: Outputs = "probs"
) -> np.ndarray:
    """Train one shadow on the rows of ``member_mask``; its (n,) confidence on every row."""
    predict = train_fn(np.asarray(member_mask, dtype=bool))
    return confidence(predict(x), y, outputs)


def shadow_confidences(
    train_fn: TrainFn, masks: np.ndarray, x: Any, y: np.ndarray, outputs: Outputs = "probs"
) -> np.ndarray:
    """(S, n) masks -> (S, n) confidences, one shadow after another in this process."""
    masks = check_masks(masks, len(y))
    return np.stack([shadow_confidence(train_fn, m, x, y, outputs) for m in masks])


def check_masks(masks: np.ndarray, n: int) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.shape[1] != n or masks.dtype != bool:
        raise ValueError(
            f"masks must be a bool (shadows, {n}) array; got {masks.dtype} {masks.shape}"
        )
    return masks


# -- per-row Gaussians and scores ----------------------------------------------------------------


@dataclass(frozen=True)
class ShadowGaussians:
    """Per-row Gaussians of the shadows' confidences, each (n,)."""

    mean_in: np.ndarray
    std_in: np.ndarray
    mean_out: np.ndarray
    std_out: np.ndarray
    count_in: np.ndarray  # shadows behind each row's "in" fit
    count_out: np.ndarray


def _fit_side(
    conf: np.ndarray, mask: np.ndarray, side: str, global_variance: bool, min_std: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    count = mask.sum(0)
    if (count == 0).any():
        raise ValueError(
            f"{int((count == 0).sum())} rows have no {side!r} shadow; every row needs at least "
            "one (use membership_matrix, or more shadows)"
        )
    mean = np.where(mask, conf, 0.0).sum(0) / count
    sq = np.where(mask, (conf - mean) ** 2, 0.0).sum(0)  # (n,) squared deviations
    if global_variance:
        dof = int((count - 1).sum())
        if dof < 1:
            raise ValueError(f"the {side!r} shadows give no spread to pool: add shadows")
        var = np.full(conf.shape[1], sq.sum() / dof)  # pooled within-row variance
    else:
        if (count < 2).any():
            raise ValueError(
                f"{int((count < 2).sum())} rows have fewer than 2 {side!r} shadows, too few for "
                "a per-row variance: use global_variance=True or at least 4 shadows"
            )
        var = sq / (count - 1)
    # a floor: shadows that agree exactly (a saturated row) must not give a zero width
    return mean, np.maximum(np.sqrt(var), min_std), count


def fit_gaussians(
    in_conf: np.ndarray,
    in_mask: np.ndarray,
    out_conf: np.ndarray,
    out_mask: np.ndarray,
    *,
    global_variance: bool = False,
    min_std: float = 1e-6,
) -> ShadowGaussians:
    """Fit each row's "in" Gaussian to ``in_conf[in_mask]`` and its "out" one to
    ``out_conf[out_mask]`` (all (S, n); the two sides may come from different shadows)."""
    if min_std <= 0:
        raise ValueError(f"min_std must be > 0, got {min_std}")
    sides = []
    for side, conf, mask in (("in", in_conf, in_mask), ("out", out_conf, out_mask)):
        conf = np.asarray(conf, dtype=np.float64)
        if conf.ndim != 2:
            raise ValueError(f"{side}_conf must be a (shadows, n) array; got {conf.shape}")
        mask = check_masks(mask, conf.shape[1])
        if mask.shape != conf.shape:
            raise ValueError(f"{side}_mask {mask.shape} must match {side}_conf {conf.shape}")
        # entries outside the mask are never read (they may be NaN: rows a shadow skipped)
        if not np.isfinite(conf[mask]).all():
            raise ValueError(f"{side}_conf must be finite where {side}_mask is True")
        sides.append(_fit_side(conf, mask, side, global_variance, min_std))
    if sides[0][0].shape != sides[1][0].shape:
        raise ValueError(f"in and out cover different rows: {in_conf.shape} vs {out_conf.shape}")
    (m_in, s_in, c_in), (m_out, s_out, c_out) = sides
    return ShadowGaussians(m_in, s_in, m_out, s_out, c_in, c_out)


def fit_lira(conf: np.ndarray, masks: np.ndarray, **kwargs: Any) -> ShadowGaussians:
    """LiRA: shadows that trained on a row are its "in" samples, the others its "out" ones."""
    masks = np.asarray(masks)
    return fit_gaussians(conf, masks, conf, ~masks, **kwargs)


def fit_offline(conf: np.ndarray, out_mask: np.ndarray, **kwargs: Any) -> ShadowGaussians:
    """Only the "out" side, for :func:`offline_scores`: shadows that never trained on the
    target rows (``out_mask`` all True) are enough. The "in" fields are NaN."""
    conf = np.asarray(conf, dtype=np.float64)
    out_mask = np.asarray(out_mask)
    g = fit_gaussians(conf, out_mask, conf, out_mask, **kwargs)
    nan = np.full_like(g.mean_out, np.nan)
    return ShadowGaussians(nan, nan, g.mean_out, g.std_out, np.zeros_like(g.count_out), g.count_out)


def fit_ulira(
    unlearned_conf: np.ndarray, retrained_conf: np.ndarray, masks: np.ndarray, **kwargs: Any
) -> ShadowGaussians:
    """U-LiRA: shadow s forgot the rows of ``masks[s]``. Its unlearned model's confidences on
    them are "in" samples, its model retrained without them gives the "out" samples."""
    return fit_gaussians(unlearned_conf, masks, retrained_conf, masks, **kwargs)


def _target(conf: np.ndarray, g: ShadowGaussians) -> np.ndarray:
    conf = np.asarray(conf, dtype=np.float64)
    if conf.shape[-1:] != g.mean_in.shape:
        raise ValueError(f"target confidences {conf.shape} must end in the {len(g.mean_in)} rows")
    if not np.isfinite(conf).all():
        raise ValueError("target confidences must be finite")
    return conf


def online_scores(target_conf: np.ndarray, g: ShadowGaussians) -> np.ndarray:
    """The log likelihood ratio of each row's target confidence, "in" over "out" (same shape
    as ``target_conf``: (n,), or (T, n) for T targets)."""
    c = _target(target_conf, g)
    if (g.count_in == 0).any():
        raise ValueError("these Gaussians have no 'in' side (fit_offline): use offline_scores")
    return norm.logpdf(c, g.mean_in, g.std_in) - norm.logpdf(c, g.mean_out, g.std_out)


def offline_scores(target_conf: np.ndarray, g: ShadowGaussians) -> np.ndarray:
    """``log Phi((c - mu_out) / s_out)``: how far above the "out" shadows the target is."""
    c = _target(target_conf, g)
    return norm.logcdf(c, g.mean_out, g.std_out)


# -- metrics -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackMetrics:
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    positives: int
    negatives: int

    @property
    def min_fpr(self) -> float:
        """The smallest non-zero FPR the negatives can show (one false positive): when it is
        above a target FPR, the TPR reported there is the TPR at zero false positives."""
        return 1.0 / self.negatives

    def as_dict(self) -> dict[str, float]:
        return {
            "auc": self.auc,
            "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
            "tpr_at_0.1pct_fpr": self.tpr_at_01pct_fpr,
            "positives": float(self.positives),
            "negatives": float(self.negatives),
            "min_fpr": self.min_fpr,
        }


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    """The best TPR of a ROC curve among its points with FPR <= ``max_fpr``."""
    return float(tpr[fpr <= max_fpr].max())  # (0, 0) is always on the curve


def attack_metrics(scores: np.ndarray, is_member: np.ndarray) -> AttackMetrics:
    """AUC and TPR at 1% / 0.1% FPR of ``scores`` (higher = member) against the truth."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_member = np.asarray(is_member).ravel()
    if is_member.dtype != bool or is_member.shape != scores.shape:
        raise ValueError(
            f"is_member must be a bool array shaped like scores {scores.shape}; got "
            f"{is_member.dtype} {is_member.shape}"
        )
    pos, neg = int(is_member.sum()), int((~is_member).sum())
    if pos == 0 or neg == 0:
        raise ValueError(f"need members and non-members; got {pos} and {neg}")
    if np.isnan(scores).any():
        raise ValueError(f"scores hold {int(np.isnan(scores).sum())} NaNs")
    fpr, tpr, _ = roc_curve(is_member, scores, drop_intermediate=False)
    return AttackMetrics(
        float(auc(fpr, tpr)), tpr_at_fpr(fpr, tpr, 0.01), tpr_at_fpr(fpr, tpr, 0.001), pos, neg
    )


def forget_metrics(
    g: ShadowGaussians,
    unlearned_conf: np.ndarray,
    retrained_conf: np.ndarray,
    *,
    online: bool = True,
) -> AttackMetrics:
    """U-LiRA's figure: the forget rows under the unlearned target (positives) against the
    same rows under a target retrained without them (negatives)."""
    score = online_scores if online else offline_scores
    pos, neg = score(unlearned_conf, g).ravel(), score(retrained_conf, g).ravel()
    truth = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    return attack_metrics(np.concatenate([pos, neg]), truth)


# -- a train_fn for the platform's models --------------------------------------------------------


def mask_seed(seed: int, member_mask: np.ndarray) -> int:
    """A seed that depends on ``seed`` and the exact rows of the mask: shadows with different
    rows start from different weights and batch orders, and a shadow is reproducible from its
    mask alone (in this process or in a Ray task)."""
    digest = hashlib.blake2b(np.packbits(np.asarray(member_mask, bool)).tobytes(), digest_size=8)
    return derive_seed(seed, *np.frombuffer(digest.digest(), np.uint32).tolist())


@dataclass(frozen=True, eq=False)  # eq=False: fields are arrays, compared by identity
class MLPShadowTrainer:
    """``train_fn`` for the platform's models: a fresh ``build_model`` trained on the base rows
    plus the masked candidate rows by ``training.train_shard`` (one slice), with one torch
    thread. Its ``predict_fn`` returns float64 logits: pass ``outputs="logits"`` with it."""

    features: np.ndarray  # (n, D) float32: the candidate rows
    labels: np.ndarray  # (n,) int64
    model: ModelConfig
    training: TrainingConfig
    feature_shape: Sequence[int]
    num_classes: int
    seed: int = 0
    base_features: np.ndarray | None = None  # (m, D): rows every shadow trains on
    base_labels: np.ndarray | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        problems = []
        if np.ndim(self.labels) != 1 or len(self.features) != len(self.labels):
            problems.append(
                f"features ({len(self.features)} rows) and labels {np.shape(self.labels)} must "
                "cover the same candidate rows"
            )
        if (self.base_features is None) != (self.base_labels is None) or (
            self.base_features is not None and len(self.base_features) != len(self.base_labels)
        ):
            problems.append("base_features and base_labels must be given together, row for row")
        if self.threads < 1:
            problems.append(f"threads must be >= 1, got {self.threads}")
        if problems:
            raise ValueError("MLPShadowTrainer: " + "; ".join(problems))

    def __call__(self, member_mask: np.ndarray) -> PredictFn:
        member_mask = np.asarray(member_mask, bool)
        if member_mask.shape != (len(self.labels),):
            raise ValueError(f"member_mask must be ({len(self.labels)},); got {member_mask.shape}")
        x, y = self.features[member_mask], self.labels[member_mask]
        if self.base_features is not None:
            x = np.concatenate([self.base_features, x])
            y = np.concatenate([self.base_labels, y])
        data = ShardData(
            0,
            np.arange(len(y), dtype=np.int64),
            np.zeros(len(y), np.int32),
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            torch.from_numpy(np.asarray(y, dtype=np.int64)),
            1,
        )
        # torch_threads=0: train_shard leaves the thread count alone; this context sets it
        # and gives the caller's back
        cfg = self.training.model_copy(update={"torch_threads": 0})
        with torch_threads(self.threads):
            state = train_shard(
                data,
                self.model,
                cfg,
                seed=mask_seed(self.seed, member_mask),
                feature_shape=self.feature_shape,
                num_classes=self.num_classes,
            )[-1].state
        net = build_model(self.model, self.feature_shape, self.num_classes)
        net.load_state_dict(state)
        net.eval()

        def predict(features: np.ndarray) -> np.ndarray:
            with torch_threads(self.threads), torch.no_grad():
                z = net(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
            return z.double().numpy()

        return predict
