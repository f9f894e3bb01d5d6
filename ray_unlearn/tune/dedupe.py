"""Sweep trials that would run the same thing: counted once.

Two grid points are the same trial when their resolved run configs act the same and their
serving policies are equal. A config section of a method acts only on runs of that method,
except the keys the method declares ``shared_keys`` (read on every run: ``hybrid.record``);
so ``unlearning.strategy: [sisa, hs]`` crossed with ``hybrid.threshold: [0.0, 0.05, 0.3]``
is four trials, not six: SISA never reads the threshold.
"""

from __future__ import annotations

import json
from typing import Any

from ray_unlearn.platform.methods import registry
from ray_unlearn.tune.spec import SweepSpec, grid_points, num_trials, trial_config, trial_policy


def effective_key(spec: SweepSpec, params: dict[str, Any]) -> str:
    """What a trial runs, as one string: its resolved config with the sections its method
    does not read put back to their defaults, plus its serving policy."""
    cfg = trial_config(spec, params)
    doc = cfg.model_dump(mode="json")
    own = registry.run_method(cfg)
    for method in registry.methods():
        if method is own:
            continue
        for section in method.sections:
            value = doc.get(section.key)
            if value is None:
                continue
            kept = {k: value[k] for k in method.shared_keys if k in value}
            if section.optional:  # its default is null
                doc[section.key] = kept or None
            else:
                doc[section.key] = {**section.model().model_dump(mode="json"), **kept}
    return json.dumps([doc, trial_policy(spec, params)], sort_keys=True, default=str)


def unique_points(spec: SweepSpec) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    """(the grid's points with each trial once, in order; (index of a skipped point, index
    of the point it repeats) for every duplicate)."""
    seen: dict[str, int] = {}
    points = grid_points(spec)
    keep, skipped = [], []
    for i, p in enumerate(points):
        key = effective_key(spec, p)
        if key in seen:
            skipped.append((i, seen[key]))
        else:
            seen[key] = i
            keep.append(p)
    return keep, skipped


def planned(spec: SweepSpec) -> tuple[int, list[tuple[int, int]]]:
    """(trials the sweep runs, the skipped grid points as :func:`unique_points` gives them).
    No Ray: the CLI prints it before Ray and Tune start. A random search draws its points
    in Tune, so it skips nothing here."""
    if spec.search.method != "grid":
        return num_trials(spec), []
    points, skipped = unique_points(spec)
    return len(points) * spec.search.num_samples, skipped
