"""RUM: memorization-aware approximate unlearning.

RUM splits a forget set into ``low``, ``medium`` and ``high`` memorization groups (tertiles
of a score oriented by :func:`ray_unlearn.platform.methods.rum.memorization.as_memorization`, so a
proxy where high means *less* memorized, like confidence, is handled) and unlearns the
groups in sequence, low first, each with the algorithm named for it: the model is refined
group by group, and the hard (highly memorized) samples come last, when the easy ones no
longer interfere.

Its quality (ToW, ToW-MIA, seed intervals) is measured by :mod:`ray_unlearn.platform.eval.tow`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ray_unlearn.platform.methods.approximate import ALGORITHMS, ApproxSettings, unlearn
from ray_unlearn.platform.methods.rum.memorization import as_memorization

GROUPS = ("low", "medium", "high")


@dataclass(frozen=True)
class RumPlan:
    """Which algorithm unlearns which memorization group (None: leave the group alone)."""

    score: str = "confidence"
    algorithms: dict[str, str | None] = field(
        default_factory=lambda: {"low": "finetune", "medium": "neggrad_plus", "high": "salun"}
    )

    def __post_init__(self):
        bad = {g: a for g, a in self.algorithms.items() if a is not None and a not in ALGORITHMS}
        unknown = set(self.algorithms) - set(GROUPS)
        if bad or unknown:
            raise ValueError(
                f"RUM plan: groups must be {GROUPS} (got extra {sorted(unknown)}) and "
                f"algorithms one of {sorted(ALGORITHMS)} or null (got {bad})"
            )


def split_groups(score_name: str, scores: np.ndarray) -> dict[str, np.ndarray]:
    """Indices of the low / medium / high memorization tertiles (NaN scores count as high)."""
    mem = as_memorization(score_name, scores)
    mem = np.where(np.isnan(mem), np.inf, mem)
    order = np.argsort(mem, kind="stable")
    parts = np.array_split(order, 3)
    return {g: np.sort(p) for g, p in zip(GROUPS, parts, strict=True)}


def rum_unlearn(
    model: nn.Module,
    forget: tuple[torch.Tensor, torch.Tensor],
    retain: tuple[torch.Tensor, torch.Tensor],
    scores: np.ndarray,
    plan: RumPlan,
    settings: ApproxSettings | None = None,
) -> nn.Module:
    """Unlearn ``forget`` group by group (low, medium, high) as ``plan`` says."""
    fx, fy = forget
    if len(scores) != len(fy):
        raise ValueError(f"one score per forget sample: {len(scores)} scores, {len(fy)} samples")
    groups = split_groups(plan.score, scores)
    out = model
    for g in GROUPS:
        algo, idx = plan.algorithms.get(g), groups[g]
        if algo is None or not len(idx):
            continue
        sel = torch.from_numpy(idx)
        out = unlearn(algo, out, (fx[sel], fy[sel]), retain, settings)
    return out
