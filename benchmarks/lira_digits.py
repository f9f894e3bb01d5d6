"""LiRA on digits: what shadow models cost and how the attack's figures move with their number.

Run:  .venv/bin/python benchmarks/lira_digits.py --out results/lira_digits [--quick]

Data: all 1797 rows of scikit-learn's digits are candidates. Two target models are trained
on complementary seeded halves (``membership_matrix(n, 2)``), so every row is a member of
one target and a non-member of the other: 1797 positives and 1797 negatives (enough for a
0.1% FPR to mean about 2 false positives). Every model is the platform's MLP (hidden
[128], configs/digits.yaml's training: 40 epochs, batch 32, Adam lr 2e-3) trained by
``platform.lira.MLPShadowTrainer`` (``training.train_shard``, one slice, one torch thread).

Shadows: for each count S (full 4, 8, 16, 32; quick 4, 8) a fresh balanced plan of S
shadows (each row in S/2 of them), trained as parallel Ray tasks (``train.shadow``, 1 CPU
each on ``ray.init(num_cpus=2)``). Per S: the wall time of its shadows, and the attack's
AUC and TPR at 1% / 0.1% FPR, online with per-row variances, online with the pooled
("global") variance, and offline (pooled). ``raw_confidence`` is the baseline without
shadows: one global threshold on the target's confidence. ``seconds_per_shadow`` is one
model (target B, about 900 rows) trained in this process after a first one warmed torch
up (wall and CPU seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import ray
from sklearn.datasets import load_digits

from ray_unlearn.platform.core.config import ModelConfig, TrainingConfig
from ray_unlearn.platform.eval.lira import (
    MLPShadowTrainer,
    attack_metrics,
    fit_lira,
    membership_matrix,
    offline_scores,
    online_scores,
    shadow_confidence,
)
from ray_unlearn.train.shadow import shadow_confidences_ray


def _metrics(scores_a, scores_b, half) -> dict[str, float]:
    """Target A trained on ``half``, target B on the rest: members are A's half and B's."""
    truth = np.concatenate([half, ~half])
    return attack_metrics(np.concatenate([scores_a, scores_b]), truth).as_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/lira_digits"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    counts = (4, 8) if args.quick else (4, 8, 16, 32)

    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    trainer = MLPShadowTrainer(
        x,
        y,
        ModelConfig(hidden=[128]),
        TrainingConfig(epochs=40, batch_size=32, lr=2e-3),
        feature_shape=(1, 8, 8),
        num_classes=10,
    )
    half = membership_matrix(len(y), 2, seed=12345)[0]
    conf_a = shadow_confidence(trainer, half, x, y, "logits")  # also warms torch up
    t0, c0 = time.perf_counter(), time.process_time()
    conf_b = shadow_confidence(trainer, ~half, x, y, "logits")
    per_shadow = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    report = {
        "rows": len(y),
        "seconds_per_shadow": per_shadow,
        "raw_confidence": _metrics(conf_a, conf_b, half),
        "shadows": {},
    }

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for s in counts:
            masks = membership_matrix(len(y), s, seed=s)
            t0 = time.perf_counter()
            conf = shadow_confidences_ray(trainer, masks, x, y, "logits")
            wall = time.perf_counter() - t0
            per_row, pooled = fit_lira(conf, masks), fit_lira(conf, masks, global_variance=True)
            report["shadows"][s] = {
                "wall_s": wall,
                "online_per_row": _metrics(
                    online_scores(conf_a, per_row), online_scores(conf_b, per_row), half
                ),
                "online_global": _metrics(
                    online_scores(conf_a, pooled), online_scores(conf_b, pooled), half
                ),
                "offline_global": _metrics(
                    offline_scores(conf_a, pooled), offline_scores(conf_b, pooled), half
                ),
            }
            print(f"S={s}: {wall:.1f} s", flush=True)
    finally:
        ray.shutdown()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"one shadow: {per_shadow['wall_s']:.2f} s wall, {per_shadow['cpu_s']:.2f} s CPU")
    print(f"{'attack':<26}{'AUC':>7}{'TPR@1%':>9}{'TPR@0.1%':>10}")
    rows = [("raw confidence", report["raw_confidence"])]
    for s, r in report["shadows"].items():
        rows += [
            (f"S={s} {k}", r[k]) for k in ("online_per_row", "online_global", "offline_global")
        ]
    for name, m in rows:
        print(
            f"{name:<26}{m['auc']:>7.3f}{m['tpr_at_1pct_fpr']:>9.3f}{m['tpr_at_0.1pct_fpr']:>10.3f}"
        )


if __name__ == "__main__":
    main()
