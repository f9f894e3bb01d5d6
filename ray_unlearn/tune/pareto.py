"""The result of a sweep: the Pareto front of accuracy vs unlearning cost vs latency."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# metric -> True when larger is better
OBJECTIVES = {"accuracy": True, "unlearn_s": False, "latency_mean_ms": False}


def dominates(a: dict[str, float], b: dict[str, float]) -> bool:
    """``a`` is at least as good as ``b`` on every objective and better on one."""
    at_least, better = True, False
    for m, up in OBJECTIVES.items():
        x, y = (a[m], b[m]) if up else (-a[m], -b[m])
        if x < y:
            at_least = False
            break
        if x > y:
            better = True
    return at_least and better


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the rows no other row dominates (rows missing a metric are skipped)."""
    ok = [i for i, r in enumerate(rows) if all(r.get(m) is not None for m in OBJECTIVES)]
    return [i for i in ok if not any(dominates(rows[j], rows[i]) for j in ok if j != i)]


def choose(rows: Sequence[dict[str, Any]], front: list[int], metric: str, mode: str) -> int:
    """The front's best row by ``metric``; ties go to the cheaper unlearning, then latency."""
    if not front:
        raise ValueError("no trial finished with every metric: nothing to choose from")
    sign = -1.0 if mode == "max" else 1.0
    return min(
        front,
        key=lambda i: (sign * rows[i][metric], rows[i]["unlearn_s"], rows[i]["latency_mean_ms"]),
    )


def plot_front(rows: Sequence[dict[str, Any]], front: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    cost = [r["unlearn_s"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    lat = [r["latency_mean_ms"] for r in rows]
    sc = ax.scatter(cost, acc, c=lat, cmap="viridis", s=40, label="trials")
    fig.colorbar(sc, ax=ax, label="mean serving latency (ms)")
    fx = [cost[i] for i in front]
    fy = [acc[i] for i in front]
    ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="red", label="Pareto front")
    for i in front:
        ax.annotate(rows[i]["label"], (cost[i], acc[i]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("unlearning wall seconds (whole deletion stream)")
    ax.set_ylabel("test accuracy after the stream")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_trial(history: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """One trial: accuracy and cumulative unlearning seconds per deletion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["deletions"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [h["accuracy"] for h in history], "o-", label="accuracy")
    ax.set_xlabel("deletions")
    ax.set_ylabel("test accuracy")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["unlearn_s"] for h in history], "s--", color="tab:red")
    ax2.set_ylabel("unlearning seconds (cumulative)", color="tab:red")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
