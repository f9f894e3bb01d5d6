"""Unlearning quality against a model retrained from scratch without the forget set (the gold
standard): the tug-of-war measures ToW and ToW-MIA, and per-seed intervals.

    ToW     = (1 - |dA_forget|) (1 - |dA_retain|) (1 - |dA_test|)
    ToW-MIA = (1 - |dMIA_forget|) (1 - |dA_retain|) (1 - |dA_test|)

with dA the accuracy differences between the unlearnt and the retrained model on each set,
and dMIA the difference of the membership-inference attack's member rate on the forget set
(:func:`ray_unlearn.platform.eval.mia.membership_inference`). 1 is "indistinguishable".
Over seeds, :func:`seed_interval` gives the mean and a Student-t 95% interval.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ray_unlearn.platform.eval.mia import membership_inference

__all__ = ["quality", "seed_interval", "tow"]


@torch.no_grad()
def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, np.ndarray]:
    # one forward pass over all of x in eval mode (the computation RUM's probabilities() does)
    model.eval()
    p = torch.softmax(model(x), dim=1)
    return float((p.argmax(1) == y).float().mean()), p.numpy()


def quality(
    model: nn.Module,
    reference: nn.Module,
    forget: tuple[torch.Tensor, torch.Tensor],
    retain: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    attack: str = "threshold",
    attack_repeats: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracies, forget-set MIA, ToW and ToW-MIA of ``model`` vs the retrained ``reference``.

    Each model gets its own attack, fitted on its own retain vs test outputs (``attack``:
    ``threshold`` or ``logistic``), as an adversary holding that model would. Where the
    attack has little signal (balanced accuracy near 0.5, as on well-generalising models)
    its member rate swings with the random half of the test rows it is fitted on, so the
    rate is the mean over ``attack_repeats`` fits on different halves (seeds ``seed``,
    ``seed + 1``, ...); ``*_mia_attack_accuracy`` reports how much signal there was."""
    if attack_repeats < 1:
        raise ValueError(f"attack_repeats must be >= 1, got {attack_repeats}")
    out: dict[str, float] = {}
    probs = {}
    for name, m in (("model", model), ("reference", reference)):
        for set_name, (x, y) in (("forget", forget), ("retain", retain), ("test", test)):
            a, p = _acc(m, x, y)
            out[f"{name}_accuracy_{set_name}"] = a
            probs[(name, set_name)] = p
        fits = [
            membership_inference(
                (probs[(name, "retain")], retain[1].numpy()),
                (probs[(name, "test")], test[1].numpy()),
                (probs[(name, "forget")], forget[1].numpy()),
                kind=attack,
                seed=seed + i,
            )
            for i in range(attack_repeats)
        ]
        for key in ("mia_forget", "mia_attack_accuracy"):
            out[f"{name}_{key}"] = float(np.mean([f[key] for f in fits]))
    d = {
        s: abs(out[f"model_accuracy_{s}"] - out[f"reference_accuracy_{s}"])
        for s in ("forget", "retain", "test")
    }
    d_mia = abs(out["model_mia_forget"] - out["reference_mia_forget"])
    out["tow"] = tow(d["forget"], d["retain"], d["test"])
    out["tow_mia"] = tow(d_mia, d["retain"], d["test"])
    return out


def tow(d_forget: float, d_retain: float, d_test: float) -> float:
    """Tug-of-war: the product of (1 - |difference|) on forget (accuracy or MIA), retain, test."""
    return (1 - abs(d_forget)) * (1 - abs(d_retain)) * (1 - abs(d_test))


def seed_interval(values) -> dict[str, float]:
    """Mean, sample sd and Student-t 95% interval of per-seed values (one value: width 0)."""
    from scipy.stats import t

    a = np.asarray(values, dtype=np.float64)
    if not len(a):
        raise ValueError("seed_interval needs at least one value")
    mean = float(a.mean())
    sd = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    half = float(t.ppf(0.975, len(a) - 1) * sd / np.sqrt(len(a))) if len(a) > 1 else 0.0
    return {"mean": mean, "sd": sd, "ci95_low": mean - half, "ci95_high": mean + half}
