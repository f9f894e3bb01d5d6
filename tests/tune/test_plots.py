"""The trial plot a reader opens in MLflow: whole deletions on the x axis, one colour per
series, a legend that covers no line (no Ray)."""

from __future__ import annotations

import matplotlib.pyplot as plt

from ray_unlearn.tune.pareto import trial_figure


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
