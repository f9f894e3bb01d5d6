"""The trial plot a reader opens in MLflow: whole deletions on the x axis, one colour per
series, a legend that covers no line (no Ray)."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D

from ray_unlearn.tune.pareto import front_figure, trial_figure


def test_trial_figure_has_integer_ticks_distinct_colours_and_a_legend_outside_the_axes():
    history = [
        {
            "deletions": i,
            "val_accuracy": 0.9 - 0.01 * i,
            "test_accuracy": 0.88 - 0.01 * i,
            "served_accuracy": 0.91,
            "unlearn_s": 0.8 * i,
            "unlearn_cpu_s": 0.6 * i,
        }
        for i in range(1, 4)
    ]
    fig = trial_figure(history, "t")
    try:
        fig.canvas.draw()
        ax, ax2 = fig.axes
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        lines = ax.get_lines() + ax2.get_lines()
        assert len(lines) == 5 and len({ln.get_color() for ln in lines}) == 5
        (legend,) = fig.legends
        assert len(legend.get_texts()) == 5
        box = legend.get_window_extent()
        assert not any(box.overlaps(a.get_window_extent()) for a in (ax, ax2))
    finally:
        plt.close(fig)


def _face_and_edge(handle) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """RGBA face and edge colour a legend entry draws (a marker line or a scatter)."""
    if isinstance(handle, Line2D):
        return to_rgba(handle.get_markerfacecolor()), to_rgba(handle.get_markeredgecolor())
    face, edge = handle.get_facecolor(), handle.get_edgecolor()
    return (tuple(face[0]) if len(face) else (0, 0, 0, 0)), tuple(edge[0])


def test_front_legend_shows_the_marks_as_drawn():
    rows = [
        {
            "label": f"t{i}",
            "val_accuracy": 0.8 + 0.01 * i,
            "test_accuracy": 0.8,
            "unlearn_cpu_s": 1.0 + i,
            "latency_mean_ms": 2.0 + 3 * i,
        }
        for i in range(4)
    ]
    fig = front_figure(rows, [0, 3], "s")
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        trials, ring = ax.collections[:2]
        legend = ax.get_legend()
        assert [t.get_text() for t in legend.get_texts()] == [
            "trial (latency_mean_ms: colour bar)",
            "Pareto front",
        ]
        (t_face, _), (r_face, r_edge) = map(_face_and_edge, legend.legend_handles)
        # a trial's colour is its latency: the legend's trial mark takes none of them (it
        # once took the first trial's colour, which no other point had)
        assert t_face not in {tuple(c) for c in trials.get_facecolors()}
        assert r_edge == tuple(ring.get_edgecolors()[0]) and r_face[3] == 0  # a hollow red ring
    finally:
        plt.close(fig)
