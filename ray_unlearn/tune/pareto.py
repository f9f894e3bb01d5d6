"""The result of a sweep: the Pareto front of accuracy vs unlearning cost vs latency."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# metric -> True when larger is better (the default objectives; a sweep's ``pareto`` section
# may pick served accuracy, wall seconds or p99 latency instead)
OBJECTIVES = {"val_accuracy": True, "unlearn_cpu_s": False, "latency_mean_ms": False}


def dominates(
    a: dict[str, float], b: dict[str, float], objectives: dict[str, bool] | None = None
) -> bool:
    """``a`` is at least as good as ``b`` on every objective and better on one."""
    at_least, better = True, False
    for m, up in (objectives or OBJECTIVES).items():
        x, y = (a[m], b[m]) if up else (-a[m], -b[m])
        if x < y:
            at_least = False
            break
        if x > y:
            better = True
    return at_least and better


def pareto_front(
    rows: Sequence[dict[str, Any]], objectives: dict[str, bool] | None = None
) -> list[int]:
    """Indices of the rows no other row dominates (rows missing a metric are skipped)."""
    objectives = objectives or OBJECTIVES
    ok = [i for i, r in enumerate(rows) if all(r.get(m) is not None for m in objectives)]
    return [i for i in ok if not any(dominates(rows[j], rows[i], objectives) for j in ok if j != i)]


def choose(
    rows: Sequence[dict[str, Any]],
    front: list[int],
    metric: str,
    mode: str,
    objectives: dict[str, bool] | None = None,
) -> int:
    """The front's best row by ``metric``; ties go to the other objectives in order."""
    if not front:
        raise ValueError("no trial finished with every metric: nothing to choose from")
    objectives = objectives or OBJECTIVES
    sign = -1.0 if mode == "max" else 1.0
    rest = [m for m in objectives if m != metric]
    return min(
        front,
        key=lambda i: (
            sign * rows[i][metric],
            *((-rows[i][m] if objectives[m] else rows[i][m]) for m in rest),
        ),
    )


_AXIS = {
    "val_accuracy": "validation accuracy after the stream",
    "served_accuracy": "accuracy of the answers served during the stream (validation rows)",
    "unlearn_cpu_s": "unlearning CPU seconds (whole deletion stream)",
    "unlearn_s": "unlearning wall seconds (whole deletion stream)",
    "latency_mean_ms": "mean serving latency (ms)",
    "latency_p99_ms": "p99 serving latency (ms)",
}


def plot_front(
    rows: Sequence[dict[str, Any]],
    front: list[int],
    path: Path,
    title: str,
    objectives: dict[str, bool] | None = None,
) -> None:
    """Cost (x) vs accuracy (y), latency as colour; the front's points ringed and labelled."""
    fig = front_figure(rows, front, title, objectives)
    import matplotlib.pyplot as plt  # after front_figure chose the Agg backend

    fig.savefig(path, dpi=120)
    plt.close(fig)


def front_figure(
    rows: Sequence[dict[str, Any]],
    front: list[int],
    title: str,
    objectives: dict[str, bool] | None = None,
):
    """The figure of :func:`plot_front` (a matplotlib Figure, Agg backend)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    acc_m, cost_m, lat_m = list(objectives or OBJECTIVES)
    cost = [r[cost_m] for r in rows]
    acc = [r[acc_m] for r in rows]
    lat = [r[lat_m] for r in rows]
    # the front's labels are listed under the plot, numbered like their points, each wrapped
    # to the figure's width (long trial labels ran off the right edge)
    notes = [
        textwrap.fill(
            f"{n}: {rows[i]['label']}  ({acc_m} {acc[i]:.4f}, "
            f"test_accuracy {rows[i].get('test_accuracy') or float('nan'):.4f}, "
            f"{cost_m} {cost[i]:.3g}, {lat_m} {lat[i]:.3g})",
            width=125,
            subsequent_indent="    ",
        )
        for n, i in enumerate(front, start=1)
    ]
    footer = "\n".join(notes)
    lines = footer.count("\n") + 1 if notes else 0
    fig, ax = plt.subplots(figsize=(8, 5.5 + 0.13 * lines))
    sc = ax.scatter(cost, acc, c=lat, cmap="viridis", s=40)
    fig.colorbar(sc, ax=ax, label=_AXIS[lat_m])
    ax.scatter(
        [cost[i] for i in front],
        [acc[i] for i in front],
        s=160,
        facecolors="none",
        edgecolors="red",
    )
    for n, i in enumerate(front, start=1):
        ax.annotate(str(n), (cost[i], acc[i]), fontsize=8, color="red", xytext=(6, 4),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel(_AXIS[cost_m])
    ax.set_ylabel(_AXIS[acc_m])
    ax.set_title(title)
    # The legend names the marks, not colours: a colour-mapped scatter's own legend entry
    # takes the first trial's colour, which matched no other point; the colour bar says
    # what the colours mean.
    trial = Line2D(
        [],
        [],
        marker="o",
        ls="",
        color="grey",
        mfc="lightgrey",
        label=f"trial ({lat_m}: colour bar)",
    )
    ring = Line2D([], [], marker="o", ls="", ms=13, color="red", mfc="none", label="Pareto front")
    ax.legend(handles=[trial, ring], loc="best", fontsize=8)
    # test accuracy beside each front point: reported, never what the front was chosen on
    fig.text(0.01, 0.01, footer, fontsize=6.5, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, 0.13 * lines / (5.5 + 0.13 * lines) + 0.03, 1, 1))
    return fig


def plot_trial(history: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """One trial: validation / test / served accuracy (left axis) and cumulative unlearning
    seconds (right axis) per deletion. One colour per series, whole deletions on the x axis,
    and the legend below the axes, where it covers no line."""
    fig = trial_figure(history, title)
    import matplotlib.pyplot as plt  # after trial_figure chose the Agg backend

    fig.savefig(path, dpi=100)
    plt.close(fig)


def trial_figure(history: Sequence[dict[str, Any]], title: str):
    """The figure of :func:`plot_trial` (a matplotlib Figure, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [h["deletions"] for h in history]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax2 = ax.twinx()
    series = [
        (ax, "val_accuracy", "validation accuracy", "o-", "tab:blue"),
        (ax, "test_accuracy", "test accuracy (reported only)", "d-.", "tab:green"),
        (ax, "served_accuracy", "accuracy of the answers served", "^:", "tab:purple"),
        (ax2, "unlearn_s", "unlearning wall s (cumulative)", "s--", "tab:red"),
        (ax2, "unlearn_cpu_s", "unlearning CPU s (cumulative)", "x--", "tab:orange"),
    ]
    for axis, key, label, style, colour in series:
        if all(key in h for h in history):
            axis.plot(steps, [h[key] for h in history], style, color=colour, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # deletions are counts
    ax.set_xlabel("deletions")
    ax.set_ylabel("accuracy")
    ax2.set_ylabel("unlearning seconds (cumulative)")
    ax2.set_ylim(bottom=0)
    handles = [h for a in (ax, ax2) for h in a.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    return fig
