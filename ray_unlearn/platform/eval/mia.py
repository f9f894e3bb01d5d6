"""Evaluation shared by every unlearning strategy: accuracy and membership inference.

For a model (one network, or the ensemble's aggregate) and three sets of samples:

* retain: training rows still live (members),
* forget: the rows whose deletion was requested,
* test:   held-out rows (never trained on),

it reports accuracy on each set and a membership-inference attack (MIA) on the forget set.
The attack sees what a client of the model sees, the output probabilities, and scores a
sample by its true-class confidence (``log p_y``; members are usually more confident). It
is trained to tell retain samples (label "member") from test samples ("non-member"), on a
balanced sample of each and half of the test set; the other half with as many other
retain samples measures the attack's own balanced accuracy (0.5 = no signal). Applied to
the forget set, the fraction predicted "member" says how much the model still behaves as if
it had trained on them; the reference is the same number for a model retrained from
scratch without the forget set (its forget rows are non-members by construction).

Attacks: ``threshold`` (one cut on ``log p_y`` that maximises balanced accuracy) and
``logistic`` (logistic regression on log p_y, log(1 - p_y), the entropy and the margin).
The ensemble's probabilities are the mean of its shard models' probabilities; its labels
follow the run's aggregation rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ray_unlearn.platform.core.aggregate import aggregate
from ray_unlearn.platform.core.data import load_dataset
from ray_unlearn.platform.core.models import build_model
from ray_unlearn.platform.core.plan import TEST
from ray_unlearn.platform.core.training import predict_proba, train_shard

if TYPE_CHECKING:
    from ray_unlearn.platform.core.run import RunContext

EPS = 1e-12
# features -> (labels (n,), probabilities (n, classes))
Predictor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class EvalSet:
    name: str
    features: np.ndarray
    labels: np.ndarray
    sample_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def true_class_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs)
    return probs[np.arange(len(labels)), np.asarray(labels)]


def attack_features(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n, 4): log p_y, log(1 - p_y), entropy, margin p_y - max_{c != y} p_c."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    p = true_class_confidence(probs, labels)
    others = probs.copy()
    others[np.arange(len(labels)), labels] = -1.0
    entropy = -(probs * np.log(probs + EPS)).sum(1)
    return np.stack([np.log(p + EPS), np.log1p(-p + EPS), entropy, p - others.max(1)], axis=1)


def _balanced_accuracy(pred_member: np.ndarray, is_member: np.ndarray) -> float:
    tpr = pred_member[is_member].mean() if is_member.any() else float("nan")
    tnr = (~pred_member[~is_member]).mean() if (~is_member).any() else float("nan")
    return float((tpr + tnr) / 2)


class MembershipAttack:
    """A membership-inference attack on model outputs (see the module docstring)."""

    def __init__(self, kind: str = "threshold"):
        if kind not in ("threshold", "logistic"):
            raise ValueError(f"unknown attack {kind!r}; allowed: 'threshold', 'logistic'")
        self.kind = kind
        self.threshold: float | None = None
        self._model: Any = None

    def _score(self, probs, labels) -> np.ndarray:
        return np.log(true_class_confidence(probs, labels) + EPS)

    def fit(self, member_probs, member_labels, nonmember_probs, nonmember_labels):
        if not len(member_labels) or not len(nonmember_labels):
            raise ValueError("the attack needs at least one member and one non-member sample")
        if self.kind == "threshold":
            sm = self._score(member_probs, member_labels)
            sn = self._score(nonmember_probs, nonmember_labels)
            cuts = np.unique(np.concatenate([sm, sn]))
            # predict member when score >= cut: TPR(cut) and TNR(cut) from sorted scores
            tpr = 1.0 - np.searchsorted(np.sort(sm), cuts, side="left") / len(sm)
            tnr = np.searchsorted(np.sort(sn), cuts, side="left") / len(sn)
            best = int(np.argmax((tpr + tnr) / 2))
            # halfway to the next lower score: the same split of the fitted scores, with a
            # margin on both sides for unseen ones
            self.threshold = float(cuts[best] if best == 0 else (cuts[best - 1] + cuts[best]) / 2)
        else:
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            x = np.concatenate(
                [
                    attack_features(member_probs, member_labels),
                    attack_features(nonmember_probs, nonmember_labels),
                ]
            )
            y = np.concatenate([np.ones(len(member_labels)), np.zeros(len(nonmember_labels))])
            self._model = make_pipeline(
                StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000)
            ).fit(x, y)
        return self

    def predict(self, probs, labels) -> np.ndarray:
        """True where the attack says "member"."""
        if self.kind == "threshold":
            if self.threshold is None:
                raise ValueError("fit the attack first")
            return self._score(probs, labels) >= self.threshold
        if self._model is None:
            raise ValueError("fit the attack first")
        return self._model.predict(attack_features(probs, labels)).astype(bool)

    def member_rate(self, probs, labels) -> float:
        return float(self.predict(probs, labels).mean()) if len(labels) else float("nan")


def membership_inference(
    retain: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    forget: tuple[np.ndarray, np.ndarray],
    *,
    kind: str = "threshold",
    seed: int = 0,
) -> dict[str, float]:
    """Each argument: (probabilities, labels). Trains on half the test set and as many retain
    samples, measures on the other half, applies to the forget set."""
    rng = np.random.default_rng(seed)
    (rp, ry), (tp, ty), (fp, fy) = retain, test, forget
    t_perm = rng.permutation(len(ty))
    half = len(ty) // 2
    t_fit, t_eval = t_perm[:half], t_perm[half:]
    r_perm = rng.permutation(len(ry))
    r_fit, r_eval = r_perm[: len(t_fit)], r_perm[len(t_fit) : len(t_fit) + len(t_eval)]
    attack = MembershipAttack(kind).fit(rp[r_fit], ry[r_fit], tp[t_fit], ty[t_fit])
    pred = np.concatenate(
        [attack.predict(rp[r_eval], ry[r_eval]), attack.predict(tp[t_eval], ty[t_eval])]
    )
    truth = np.concatenate([np.ones(len(r_eval), bool), np.zeros(len(t_eval), bool)])
    return {
        "mia_forget": attack.member_rate(fp, fy),
        "mia_retain": attack.member_rate(rp[r_eval], ry[r_eval]),
        "mia_test": attack.member_rate(tp[t_eval], ty[t_eval]),
        "mia_attack_accuracy": _balanced_accuracy(pred, truth),
        "mia_threshold": float("nan") if attack.threshold is None else attack.threshold,
    }


def evaluate(
    predict: Predictor,
    retain: EvalSet,
    forget: EvalSet,
    test: EvalSet,
    *,
    attack: str = "threshold",
    seed: int = 0,
    repeats: int = 1,
) -> dict[str, float]:
    """Accuracy on retain, forget and test, and the MIA member rate of the forget set.

    ``repeats`` > 1: the attack is fitted on ``repeats`` seeded splits (seeds ``seed``,
    ``seed + 1``, ...) of the same model outputs; its figures are their means, and
    ``mia_forget_sd`` is the spread across splits (how much the attack's own fit moves the
    number). ``mia_forget_se`` is the sampling error of the forget-set rate,
    ``sqrt(p (1 - p) / n_forget)``: with a few forget rows the rate is mostly noise.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out: dict[str, float] = {}
    got = {}
    for s in (retain, forget, test):
        if len(s):
            labels, probs = predict(s.features)
            out[f"accuracy_{s.name}"] = float((labels == s.labels).mean())
            got[s.name] = (probs, s.labels)
        else:
            out[f"accuracy_{s.name}"] = float("nan")
            got[s.name] = (np.zeros((0, 1)), np.zeros(0, np.int64))
    runs = [
        membership_inference(got["retain"], got["test"], got["forget"], kind=attack, seed=seed + i)
        for i in range(repeats)
    ]
    for k in runs[0]:
        out[k] = float(np.mean([r[k] for r in runs]))
    p = out["mia_forget"]
    out["mia_forget_sd"] = float(np.std([r["mia_forget"] for r in runs]))
    out["mia_forget_se"] = (
        float(np.sqrt(p * (1 - p) / len(forget))) if len(forget) else float("nan")
    )
    out["mia_repeats"] = repeats
    out["n_retain"], out["n_forget"], out["n_test"] = len(retain), len(forget), len(test)
    return out


# -- predictors ---------------------------------------------------------------------------


def model_predictor(model: torch.nn.Module) -> Predictor:
    def predict(features: np.ndarray):
        p = predict_proba(model, torch.from_numpy(np.ascontiguousarray(features, np.float32)))
        p = p.numpy()
        return p.argmax(1), p

    return predict


def ensemble_predictor(
    states: dict[int, dict[str, torch.Tensor]], ctx: RunContext, rule: str | None = None
) -> Predictor:
    """The ensemble of shard weights ``states``: labels by ``rule`` (default: the run's
    aggregation), probabilities the mean of the shards'."""
    rule = rule or ctx.config.unlearning.aggregation
    models = []
    for k in sorted(states):
        m = build_model(ctx.config.model, ctx.feature_shape, ctx.num_classes)
        m.load_state_dict(states[k])
        models.append(m)
    if not models:
        raise ValueError("no live shard model: every shard is empty")

    def predict(features: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(features, np.float32))
        shard_probs = np.stack([predict_proba(m, x).numpy() for m in models])
        labels, _ = aggregate(shard_probs, rule)
        return labels, shard_probs.mean(0)

    return predict


def serving_states(ctx: RunContext) -> dict[int, dict[str, torch.Tensor]]:
    """The registry's serving weights, by shard."""
    store = ctx.model_store
    return {k: store.load_state(v) for k, v in store.registry().serving_versions().items()}


def serving_predictor(ctx: RunContext, rule: str | None = None) -> Predictor:
    """The registry's serving ensemble."""
    return ensemble_predictor(serving_states(ctx), ctx, rule)


def retrained_predictor(ctx: RunContext, exclude, rule: str | None = None) -> Predictor:
    """Every shard trained from scratch without ``exclude`` (the exact-unlearning reference)."""
    return ensemble_predictor(retrained_states(ctx, exclude), ctx, rule)


def retrained_states(ctx: RunContext, exclude, shards=None) -> dict[int, dict[str, torch.Tensor]]:
    """The weights of every shard (default: the registry's; ``shards`` for a run not trained
    yet) trained from scratch without ``exclude``; empty shards are left out."""
    cfg = ctx.config
    states = {}
    for k in sorted(ctx.model_store.registry().shards if shards is None else shards):
        data = ctx.shard_data(k, exclude=exclude)
        if len(data):
            stages = train_shard(
                data,
                cfg.model,
                cfg.training,
                seed=cfg.seed,
                feature_shape=ctx.feature_shape,
                num_classes=ctx.num_classes,
            )
            states[k] = stages[-1].state
    return states


def eval_sets(ctx: RunContext, forget_ids, deleted=None) -> tuple[EvalSet, EvalSet, EvalSet]:
    """(retain, forget, test): live training rows (minus ``deleted``, default the log's
    deletions, and ``forget_ids``), the trained rows among ``forget_ids``, and the live
    test rows."""
    forget_ids = np.unique(np.asarray(list(forget_ids), dtype=np.int64))
    gone = set(ctx.deletion_log.deleted_sample_ids() if deleted is None else deleted)
    gone |= set(forget_ids.tolist())
    forget_ids = forget_ids[ctx.plan.locate(forget_ids)[0] != TEST]  # trained ones only
    retain = ctx.split_records("train", gone)
    test = ctx.split_records("test", gone)
    recs = ctx.records
    if not np.isin(forget_ids, recs.sample_ids).all():
        # compacted out of the run's copy (the deletion is done): measuring what was forgotten
        # reads them from the source outside the run, which still holds them (the user's)
        from ray_unlearn.platform.core.models import text_encoder_of

        recs = load_dataset(ctx.config.data, ctx.storage, text_encoder_of(ctx.config.model))
    forget = recs.subset(recs.index_of(forget_ids))

    def mk(name, recs):
        return EvalSet(name, np.ascontiguousarray(recs.features), recs.labels, recs.sample_ids)

    return mk("retain", retain), mk("forget", forget), mk("test", test)
