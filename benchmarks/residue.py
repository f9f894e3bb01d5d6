"""Residue after deletions: an S3T run, a hybrid run with share-scaled DPUS and a RUM run with
memorization reports each take single-owner deletions, then every file under the run is
scanned for the deleted samples' ids and rows (platform/core/residue.py).

Run:  .venv/bin/python benchmarks/residue.py --out results/residue [--quick]

Each run is digits, trained in this process (no Ray), small enough to finish in minutes:

* ``s3t``     configs/digits_s3t.yaml (3 orders per shard, LoRA stages; deletions deactivate
              stages; a shard left too shallow is retrained inline);
* ``hybrid``  configs/digits.yaml with ``hybrid.record=true``, strategy ``hs`` with threshold
              0 (every request goes to share-scaled DPUS unless the record cannot remove a
              sample: then HS retrains that shard exactly; ``decisions`` counts both);
* ``rum``     configs/digits_rum.yaml routed by the stored ``holdout_kl`` score, with the
              ``confidence`` and ``holdout_kl`` memorization reports computed and stored
              under the run's reports before the first deletion.

Owners are drawn with a fixed seed among those with training rows (S3T: none in the public
split). Deletions are executed one at a time (``UnlearningEngine.forget``) with the default
``data.compact: on_delete``. ``seconds``: wall time of the deletions; ``scan_seconds``: of the
residue scan. Full: 100 deletions per run; ``--quick``: 10 and fewer epochs. ``control``: a
plain SISA run with ``data.compact: manual`` whose copy still holds the deleted rows: the scan
must find them (in the copy's ids and feature column, and wherever its raw bytes hold a row).

Writes <out>/residue.json (keys: ``runs``, each ``{kind, deletions, residue_finds, seconds,
...}``) and <out>/residue.png, and prints a table. Target: 0 finds on every run but the
control.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ray_unlearn.harness import pick_owners
from ray_unlearn.platform.core.config import load_config
from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
from ray_unlearn.platform.core.residue import scan_residue
from ray_unlearn.platform.core.run import create_run
from ray_unlearn.platform.core.runtime import train_all_shards
from ray_unlearn.platform.methods.rum.memorization import compute_run_scores

REPO = Path(__file__).resolve().parent.parent
SEED = 3
FULL = {"deletions": 100, "epochs": 10, "s3t_epochs": 10}
QUICK = {"deletions": 10, "epochs": 3, "s3t_epochs": 3}

KINDS = {
    "s3t": ("digits_s3t.yaml", lambda p: [
        f"s3t.epochs={p['s3t_epochs']}", f"s3t.pretrain_epochs={p['s3t_epochs']}",
        "model.hidden=[64,64,64]",
    ]),
    "hybrid": ("digits.yaml", lambda p: [
        f"training.epochs={p['epochs']}", "hybrid.record=true", "unlearning.strategy=hs",
        "hybrid.threshold=0", "hybrid.dpus_scale=share", "model.hidden=[64]",
    ]),
    "rum": ("digits_rum.yaml", lambda p: [
        f"training.epochs={p['epochs']}", "rum.score=holdout_kl", "model.hidden=[64]",
    ]),
    # the control: compaction left for later, so the scan must find the rows in the copy
    "control": ("digits.yaml", lambda p: [
        f"training.epochs={p['epochs']}", "data.compact=manual", "model.hidden=[64]",
    ]),
}  # fmt: skip


def one_run(kind: str, p: dict, root: Path) -> dict:
    name, overrides = KINDS[kind]
    cfg = load_config(
        REPO / "configs" / name,
        [f"storage={root / kind}", f"seed={SEED}", "training.torch_threads=1", *overrides(p)],
    )
    t0 = time.perf_counter()
    ctx = create_run(cfg)
    train_all_shards(ctx)
    reports = []
    if kind == "rum":
        compute_run_scores(ctx, ["confidence", "holdout_kl"], holdout_epochs=2)
        reports = ctx.storage.listdir(f"{ctx.layout.reports}/memorization")
    train_s = time.perf_counter() - t0
    engine = UnlearningEngine(ctx, LocalShards(ctx))
    owners = pick_owners(ctx, p["deletions"], SEED)
    decisions: dict[str, int] = {}
    t0 = time.perf_counter()
    for owner in owners:
        rec = engine.forget(owner_id=owner)
        if rec.state.value != "done":
            raise RuntimeError(f"{kind}: the deletion of owner {owner} ended {rec.state.value}")
        for info in rec.details.get("strategy_info", {}).values():
            key = info.get("decision") or info.get("strategy") or "?"
            decisions[key] = decisions.get(key, 0) + 1
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    scan = scan_residue(ctx)
    scan_s = time.perf_counter() - t0
    deleted = len(ctx.deletion_log.deleted_sample_ids())
    return {
        "kind": kind,
        "run_id": ctx.run_id,
        "deletions": len(owners),
        "deleted_samples": deleted,
        "residue_finds": sum(f["count"] for f in scan["finds"]),
        "finds": scan["finds"],
        "seconds": seconds,
        "seconds_per_deletion": seconds / max(len(owners), 1),
        "train_seconds": train_s,
        "scan_seconds": scan_s,
        "files_scanned": scan["files_scanned"],
        "bytes_scanned": scan["bytes_scanned"],
        "rows_scanned_for": scan["rows_scanned_for"],
        "unscannable_rows": scan["unscannable_rows"],
        "rows_equal_to_retained_rows": scan["rows_equal_to_retained_rows"],
        "allowed_files": len(scan["allowed"]),
        "data_rows_left": len(ctx.records),
        "reports": reports,
        "decisions": decisions,
    }


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    kinds = [r["kind"] for r in runs]
    axes[0].bar(kinds, [r["seconds_per_deletion"] for r in runs], color="#4477aa")
    axes[0].set_ylabel("seconds per deletion")
    bars = axes[1].bar(kinds, [r["residue_finds"] for r in runs], color="#cc6677")
    axes[1].bar_label(bars)  # a 0 is a result, not a missing bar
    axes[1].set_ylabel("residue finds after the deletions")
    axes[1].set_ylim(0, max(1, *[r["residue_finds"] for r in runs]))
    axes[1].yaxis.set_major_locator(MaxNLocator(integer=True))  # finds are counts
    n = runs[0]["deletions"] if runs else 0
    fig.suptitle(f"{n} single-owner deletions per run, then a scan of every file under the run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/residue"))
    ap.add_argument("--quick", action="store_true", help="10 deletions per run, 3 epochs")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset")
    args = ap.parse_args()
    p = dict(QUICK if args.quick else FULL)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    runs = []
    with tempfile.TemporaryDirectory(prefix="ru-residue-") as d:
        for kind in args.kinds.split(","):
            runs.append(one_run(kind.strip(), p, Path(d)))
            r = runs[-1]
            print(
                f"{r['kind']:7s} deletions {r['deletions']:4d}  finds {r['residue_finds']:3d}  "
                f"{r['seconds']:7.1f} s ({r['seconds_per_deletion']:.2f} s each)  "
                f"scan {r['scan_seconds']:.1f} s over {r['files_scanned']} files  "
                f"decisions {r['decisions']}",
                flush=True,
            )
    doc = {"settings": {"quick": args.quick, "seed": SEED, **p}, "runs": runs}
    (args.out / "residue.json").write_text(json.dumps(doc, indent=2))
    plot(runs, args.out / "residue.png")
    print(f"wrote {args.out / 'residue.json'} and {args.out / 'residue.png'}")


if __name__ == "__main__":
    main()
