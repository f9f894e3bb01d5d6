"""The `ray-unlearn` command as a user runs it: every command's --json document, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "ray_unlearn.cli"]
TINY = ["training.epochs=1", "partition.shards=2", "partition.slices=2", "model.hidden=[16]"]


def run_cli(*args: str, check: bool = True) -> tuple[int, dict]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run(
        [*CLI, *args, "--json"], capture_output=True, text=True, env=env, timeout=600
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, (
        f"stdout must hold exactly one JSON document, got:\n{p.stdout}\nstderr:\n{p.stderr[-3000:]}"
    )
    doc = json.loads(lines[0])
    if check:
        assert p.returncode == 0, f"exit {p.returncode}: {doc}\n{p.stderr[-3000:]}"
    return p.returncode, doc


def test_strategies_lists_sisa():
    _, doc = run_cli("strategies")
    by_name = {r["name"]: r for r in doc["strategies"]}
    assert by_name["sisa"]["exact"] is True and by_name["s3t"]["exact"] is True
    assert by_name.get("dpus", {"exact": False})["exact"] is False  # approximate


def test_unwritable_storage_and_bad_yaml_override_exit_2_with_one_message(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, doc = run_cli(
        "train",
        "--config",
        "configs/digits.yaml",
        "--storage",
        str(blocker / "runs"),
        check=False,
    )
    assert code == 2 and "a-file" in doc["error"] and "storage" in doc["error"]
    code, doc = run_cli(
        "train",
        "--config",
        "configs/digits.yaml",
        "model.hidden=[64",
        "--storage",
        str(tmp_path / "runs"),
        check=False,
    )
    assert code == 2 and "override 'model.hidden=[64'" in doc["error"]
    assert not (tmp_path / "runs").exists()  # nothing written
    p = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("ray-unlearn ")


def test_bad_config_is_reported_without_a_traceback(tmp_path):
    code, doc = run_cli(
        "train",
        "--config",
        "configs/digits.yaml",
        "partition.shards=0",
        f"storage={tmp_path}",
        check=False,
    )
    assert code == 2 and "partition.shards" in doc["error"]
    assert not (tmp_path / "runs").exists()


def test_bad_sweep_is_refused_before_anything_starts(tmp_path):
    code, doc = run_cli(
        "sweep",
        "--config",
        "configs/sweep.yaml",
        f"storage={tmp_path}",
        "space.partition.shards=[0,2]",
        "space.serving.policy=[no-such-policy]",
        check=False,
    )
    assert code == 2 and "no-such-policy" in doc["error"] and "partition.shards" in doc["error"]
    assert not any(tmp_path.iterdir())  # no MLflow store, no sweep directory


def test_policies_lists_nine_presets_and_a_removed_name_is_refused(tmp_path):
    _, doc = run_cli("policies")
    names = [r["name"] for r in doc["policies"]]
    assert len(names) == 9 and "lazy-wait" in names and "contexts" not in doc["policies"][0]
    code, doc = run_cli(
        "sweep", "--config", "configs/sweep.yaml", f"storage={tmp_path}",
        "space.serving.policy=[double-lazy-exclude]", check=False,
    )  # fmt: skip
    assert code == 2 and "'double-lazy-exclude' was removed" in doc["error"]
    assert "use 'lazy-exclude'" in doc["error"]
    assert not any(tmp_path.iterdir())


def test_forget_refuses_a_strategy_it_would_not_use(tmp_path):
    code, doc = run_cli(
        "forget", "--run", "any", "--owner", "o", "--storage", str(tmp_path), "--no-wait",
        "--strategy", "hs", check=False,
    )  # fmt: skip
    assert code == 2 and "--no-wait" in doc["error"] and "--strategy" in doc["error"]
    assert not any(tmp_path.iterdir())


@pytest.mark.ray
def test_train_forget_status_audit(tmp_path):
    store = str(tmp_path / "store")
    _, trained = run_cli("train", "--config", "configs/digits.yaml", f"storage={store}", *TINY)
    run = trained["run_id"]
    assert (
        trained["shards"] == 2 and trained["workers"] == 2 and 0.3 < trained["test_accuracy"] <= 1
    )

    # Unknown owner: a clear error, exit 2, and nothing written to the deletion log.
    code, bad = run_cli(
        "forget", "--run", run, "--owner", "nobody", "--storage", store, check=False
    )
    assert code == 2 and "unknown owner id 'nobody'" in bad["error"]
    assert not os.path.exists(os.path.join(store, "runs", run, "deletions", "requests"))

    from ray_unlearn.platform.core.plan import TEST
    from ray_unlearn.platform.core.run import open_run

    ctx = open_run(store, run)
    owner = str(ctx.plan.owner_ids[ctx.plan.shards != TEST][0])
    # A strategy the run cannot execute is refused before the request is logged.
    for name, says in [
        ("nope", "unknown strategy 'nope'"),
        ("dpus", "hybrid.record=true"),  # this run recorded no contributions
        ("s3t", "was not trained with S3T"),
    ]:
        code, bad = run_cli(
            "forget", "--run", run, "--owner", owner, "--storage", store, "--strategy", name,
            check=False,
        )  # fmt: skip
        assert code == 2 and says in bad["error"], bad
    assert not os.path.exists(os.path.join(store, "runs", run, "deletions", "requests"))

    _, done = run_cli(
        "forget", "--run", run, "--owner", owner, "--storage", store, "--request-id", "cli-1",
        "--strategy", "sisa",
    )  # fmt: skip
    assert done["request_id"] == "cli-1" and done["state"] == "done" and done["created"]
    assert done["strategy"] == "sisa"
    assert done["versions_retired"] and done["unlearn_seconds"] > 0

    _, again = run_cli(
        "forget", "--run", run, "--owner", owner, "--storage", store, "--request-id", "cli-1"
    )
    assert not again["created"] and again["state"] == "done" and again["history"] == done["history"]

    _, status = run_cli("status", "--run", run, "--request-id", "cli-1", "--storage", store)
    assert status["state"] == "done" and [h["state"] for h in status["history"]] == [
        "pending",
        "executing",
        "done",
    ]

    _, audited = run_cli("audit", "--run", run, "--owner", owner, "--storage", store)
    assert audited["clean"] and audited["live_versions_containing"] == {}
    assert audited["requests"][0]["request_id"] == "cli-1"

    _, whole = run_cli("audit", "--run", run, "--storage", store)
    assert whole["clean"] and whole["deleted_sample_count"] == len(
        done and ctx.plan.samples_of_owner(owner)
    )

    code, missing = run_cli("audit", "--run", "no-such-run", "--storage", store, check=False)
    assert code == 2 and "no run 'no-such-run'" in missing["error"]


def test_compact_and_audit_residue(tmp_path):
    """No Ray: a run trained in-process with manual compaction; the CLI shows the rows that
    wait, compacts them, passes the residue scan, and fails it on a planted id."""
    from ray_unlearn.platform.core.engine import LocalShards, UnlearningEngine
    from ray_unlearn.platform.core.plan import TEST
    from ray_unlearn.platform.core.run import create_run
    from ray_unlearn.platform.core.runtime import train_all_shards
    from tests.conftest import tiny_config

    ctx = create_run(tiny_config(tmp_path, "data.compact=manual", "training.epochs=1"))
    train_all_shards(ctx)
    owner = str(ctx.plan.owner_ids[ctx.plan.shards != TEST][0])
    UnlearningEngine(ctx, LocalShards(ctx)).forget(owner_id=owner)
    n = len(ctx.plan.samples_of_owner(owner))
    store, run = ctx.storage.uri, ctx.run_id

    code, doc = run_cli("audit", "--run", run, "--storage", store, "--residue", check=False)
    res = doc["residue"]
    assert code == 1 and not doc["clean"] and res["waiting_for_compaction"]["rows_waiting"] == n
    assert any("/data/parts/" in f["file"] for f in res["finds"])
    assert res["users_to_erase"][0]["deleted_rows"] == n  # the bundled cache: not touched

    _, compacted = run_cli("compact", "--run", run, "--storage", store)
    assert compacted["rows_removed"] == n
    _, clean = run_cli("audit", "--run", run, "--storage", store, "--residue")
    assert clean["clean"] and clean["residue"]["clean"] and clean["residue"]["finds"] == []
    assert {"deletion log", "partition plan"} <= {a["why"] for a in clean["residue"]["allowed"]}

    sid = int(ctx.plan.samples_of_owner(owner)[0])
    ctx.storage.write_json(f"{ctx.layout.reports}/leak.json", {"sample_ids": [sid]})
    code, found = run_cli("audit", "--run", run, "--storage", store, "--residue", check=False)
    assert code == 1 and found["residue"]["finds"] == [
        {"file": f"{ctx.layout.reports}/leak.json", "kind": "ids in json", "count": 1}
    ]
    code, bad = run_cli("compact", "--run", "no-such-run", "--storage", store, check=False)
    assert code == 2 and "no run 'no-such-run'" in bad["error"]
